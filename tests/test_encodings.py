"""Character sets and transfer syntaxes in, faithful text out (issue 19; docs/encodings.md).

A casegen case is written once in UTF-8 (ISO_IR 192), Explicit VR Little Endian, with names from
pydicom's character-set test files (PS3.5 H.3.1's Korean `Hong^Gildong=洪^吉洞=홍^길동`, a German
`Äneas^Rüdiger`), then again in another character set (Korean ISO 2022 IR 149 with code
extensions, Latin-1 ISO_IR 100) and transfer syntax (Implicit VR Little Endian, Explicit VR Big
Endian, Deflated Explicit VR Little Endian), by pydicom and, where dcmtk is installed, by dcmtk's
`dcmconv` (someone else's encoder). Each runs intake, interpret and rtdose: the MOQUI CSVs are
those of the UTF-8 plan byte for byte, and the RT Dose carries the same names, declared.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_charset_files
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from mqi_communicator.errors import CaseError
from mqi_communicator.formats import raw_dose, rtdose_read
from mqi_communicator.formats.plan import find_plan, read_plan, sanitize_beam_name
from mqi_communicator.intake.case import build_manifest
from mqi_communicator.interpret import interpret_case
from mqi_communicator.qa.tps_dose import TpsDoseProblem, find_tps_doses, match
from mqi_communicator.rtdose import writer as rtdose
from tests import casegen, dciodvfy, qa_gen
from tests.test_plan_standard import CUT_STEP

REFERENCE_PLAN = Path(__file__).resolve().parent / "data" / "reference" / "RP_G2_9spots_phantom.dcm"
DCMCONV = shutil.which("dcmconv")
# As dciodvfy (tests/dciodvfy.py): skipped on a developer's machine without dcmtk, a failure under CI.
needs_dcmtk = pytest.mark.skipif(
    DCMCONV is None and not dciodvfy.in_ci(), reason="dcmconv (Debian package dcmtk) not found: envs/setup.sh --dev"
)
KOREAN_2022 = ["", "ISO 2022 IR 149"]  # PS3.3 C.12.1.1.2: value 1 empty (ASCII), value 2 KS X 1001
ESC_KS_X_1001 = b"\x1b$)C"  # the escape sequence that designates KS X 1001 (PS3.3 C.12.1.1.2)
DCMCONV_OPTION = {ExplicitVRBigEndian: "+tb", DeflatedExplicitVRLittleEndian: "+td", ExplicitVRLittleEndian: "+te"}


def _charset_file_name(name: str) -> pydicom.valuerep.PersonName:
    """The PatientName of one of pydicom's character-set test files (written by others)."""
    return pydicom.dcmread(get_charset_files(name)[0]).PatientName


@dataclass(frozen=True)
class Names:
    patient_name: str
    patient_id: str
    plan_label: str  # RTPlanLabel, SH: 16 characters at most
    beams: tuple[str, str]
    source: str  # the pydicom character-set file the patient name comes from


KOREAN = Names(str(_charset_file_name("chrI2.dcm")), "환자-0001", "전립선 계획", ("좌측 빔", "우측 빔"), "chrI2.dcm")
LATIN1 = Names(
    str(_charset_file_name("chrGerm.dcm")), "MÜLLER-01", "Prostata Zoë", ("Schräg 1", "Äußere"), "chrGerm.dcm"
)
# (character set, names): Korean in UTF-8 and in ISO 2022 IR 149, German in Latin-1.
CHARACTER_SETS = {"utf8": ("ISO_IR 192", KOREAN), "korean2022": (KOREAN_2022, KOREAN), "latin1": ("ISO_IR 100", LATIN1)}
# (transfer syntax, writer): pydicom writes every one; dcmtk converts our Explicit VR Little Endian file.
ENCODINGS = {
    "implicit": (ImplicitVRLittleEndian, "pydicom"),
    "explicit": (ExplicitVRLittleEndian, "pydicom"),
    "bigendian": (ExplicitVRBigEndian, "pydicom"),
    "deflated": (DeflatedExplicitVRLittleEndian, "pydicom"),
    "bigendian-dcmtk": (ExplicitVRBigEndian, "dcmtk"),
    "deflated-dcmtk": (DeflatedExplicitVRLittleEndian, "dcmtk"),
}


def encoded(source: Path, target: Path, syntax: UID, writer: str) -> Path:
    """`source` written again to `target` in transfer syntax `syntax`, by pydicom or by dcmconv."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if writer == "dcmtk":
        assert DCMCONV, "dcmconv (dcmtk) not found"
        subprocess.run([DCMCONV, DCMCONV_OPTION[syntax], str(source), str(target)], check=True, capture_output=True)
    else:
        ds = pydicom.dcmread(source)
        if "PixelData" in ds and not syntax.is_little_endian:  # pydicom writes OW bytes as they are
            ds.PixelData = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder(">")).tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
        pydicom.dcmwrite(
            target,
            ds,
            implicit_vr=syntax.is_implicit_VR,
            little_endian=syntax.is_little_endian,
            enforce_file_format=True,
        )
    assert pydicom.dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    return target


def data_set_bytes(path: Path) -> bytes:
    """The bytes of the data set after the file meta, inflated where deflated (PS3.5 A.5)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    raw = path.read_bytes()
    start = 128 + 4 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        return zlib.decompress(raw[start:], -zlib.MAX_WBITS)
    return raw[start:]


def write_case(
    root: Path, names: Names, character_set: str | list[str], syntax: UID, writer: str, layers: int = 4
) -> Path:
    """A casegen case whose plan has `names`, in `character_set` and transfer syntax `syntax`."""
    spec = casegen.standard_case(patient_id=names.patient_id, layers=layers)
    spec.character_set = "ISO_IR 192"
    spec.beams[1].name, spec.beams[2].name = names.beams
    case = casegen.write_case(root, "enc", spec)
    plan = find_plan(case)
    ds = pydicom.dcmread(plan)
    for _ in ds.iterall():  # decode every value while the UTF-8 declaration holds (pydicom is lazy)
        pass
    ds.PatientName = names.patient_name
    ds.RTPlanLabel = names.plan_label
    ds.SpecificCharacterSet = character_set  # pydicom encodes every text value anew in it
    ds.save_as(plan, enforce_file_format=True)
    if syntax != ExplicitVRLittleEndian:
        utf8 = plan.with_suffix(".evle")
        plan.rename(utf8)
        encoded(utf8, plan, syntax, writer)
        utf8.unlink()
    return case


def csv_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "log").rglob("*.csv"))}


@pytest.fixture(scope="module")
def utf8_csvs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """The MOQUI CSVs of the plain plan (UTF-8, Explicit VR Little Endian) of each set of names."""
    from mqi_communicator import settings
    from tests.conftest import REPO

    config = settings.load(str(REPO / "config" / "config.yaml"))
    found = {}
    for names in (KOREAN, LATIN1):
        root = tmp_path_factory.mktemp("utf8")
        case = write_case(root, names, "ISO_IR 192", ExplicitVRLittleEndian, "pydicom")
        interpret_case(build_manifest(case, config), config, root / "p2")
        found[names.source] = csv_bytes(root / "p2")
    return found


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("charset", list(CHARACTER_SETS))
def test_plan_in_every_encoding_gives_the_same_csvs_and_names(
    tmp_path: Path, config: dict, utf8_csvs: dict[str, dict[str, bytes]], charset: str, encoding: str
) -> None:
    character_set, names = CHARACTER_SETS[charset]
    syntax, writer = ENCODINGS[encoding]
    if writer == "dcmtk" and DCMCONV is None and not dciodvfy.in_ci():
        pytest.skip("dcmconv (Debian package dcmtk) not found: envs/setup.sh --dev")
    case = write_case(tmp_path, names, character_set, syntax, writer)
    plan = find_plan(case)
    written = pydicom.dcmread(plan)
    assert written.file_meta.TransferSyntaxUID == syntax
    assert written.SpecificCharacterSet == character_set
    assert str(written.PatientName) == names.patient_name
    if charset == "korean2022":
        # The PS3.5 H.3.1 example's bytes, escape sequences and all, as pydicom's test file has them.
        source = pydicom.dcmread(get_charset_files(names.source)[0])
        assert source["PatientName"].value.original_string in data_set_bytes(plan)
        assert ESC_KS_X_1001 in data_set_bytes(plan)

    manifest = build_manifest(case, config)
    assert manifest["plan"]["patient_id"] == names.patient_id
    assert [b["name"] for b in manifest["beams"]] == list(names.beams)
    folders = [b["sanitized_name"] for b in manifest["beams"]]
    assert folders == [sanitize_beam_name(n) for n in names.beams] and len(set(folders)) == 2
    assert json.loads(json.dumps(manifest)) == manifest  # the manifest is written as JSON
    interpret_case(manifest, config, tmp_path / "p2")
    assert csv_bytes(tmp_path / "p2") == utf8_csvs[names.source]

    dose = np.zeros(raw_dose.PLANE_2CM.shape)
    dose[0, 200, 200] = 1.0
    out = rtdose.write_rtdose(
        dose, raw_dose.PLANE_2CM, plan, tmp_path, beam_number=2, engine_label="MOQUI", calibrated=False, bits=16
    )
    assert out.name == f"RD_{sanitize_beam_name(names.beams[0])}.dcm"
    ds = pydicom.dcmread(out)
    assert ds.SpecificCharacterSet == character_set  # the plan's: every text fits it
    assert str(ds.PatientName) == names.patient_name and ds.PatientID == names.patient_id
    assert names.beams[0] in ds.SeriesDescription and names.beams[0] in ds.ImageComments
    if charset != "utf8":  # the same bytes as the file pydicom's test suite has, in its character set
        source = pydicom.dcmread(get_charset_files(names.source)[0])
        assert ds["PatientName"].value.original_string == source["PatientName"].value.original_string
    if dciodvfy.tools() or dciodvfy.in_ci():
        dciodvfy.assert_conformant(out)


@needs_dcmtk
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_clinic_reference_plan_converted_by_dcmtk_reads_the_same(tmp_path: Path, syntax: UID) -> None:
    """The clinic's exported plan (Implicit VR Little Endian, ISO_IR 100, the SHI spots in private
    UN elements) converted by dcmtk: the same beams, layers and spots."""
    converted = encoded(REFERENCE_PLAN, tmp_path / "RP.dcm", syntax, "dcmtk")
    original, again = asdict(read_plan(REFERENCE_PLAN)), asdict(read_plan(converted))
    assert again.pop("path") == converted and original.pop("path") == REFERENCE_PLAN
    assert again == original


def whole_data_set_cuts(path: Path) -> set[int]:
    """The sizes at which a file cut short still holds a whole, smaller data set, which no byte
    count can tell from a complete one: the end of each top-level element (a plan then ends
    after its IonBeamSequence, without its ReferencedStructureSetSequence: docs/encodings.md),
    and a deflated file's trailing pad byte (PS3.5 A.5), which holds no data."""
    ds = pydicom.dcmread(path)
    size = path.stat().st_size
    if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        return {size - 1} if path.read_bytes()[-1:] == b"\x00" else set()
    # Raw (undecoded) elements know where their value lies; decoded ones (the character set) do not.
    ends = [(getattr(e, "value_tell", None), getattr(e, "length", None)) for e in map(ds.get_item, list(ds.keys()))]
    return {tell + length for tell, length in ends if tell is not None and length not in (None, 0xFFFFFFFF)}


@pytest.mark.parametrize("encoding", ["bigendian", "deflated", "deflated-dcmtk"])
def test_cut_plan_in_any_encoding_is_refused_by_name(tmp_path: Path, encoding: str) -> None:
    """Cut after every CUT_STEP-th byte (tests/test_plan_standard.py), big-endian and deflated plans
    are refused naming the plan, none read as a plan but where the cut leaves a whole data set."""
    syntax, writer = ENCODINGS[encoding]
    if writer == "dcmtk" and DCMCONV is None and not dciodvfy.in_ci():
        pytest.skip("dcmconv (Debian package dcmtk) not found: envs/setup.sh --dev")
    case = write_case(tmp_path, KOREAN, KOREAN_2022, syntax, writer)
    plan = find_plan(case)
    whole = plan.read_bytes()
    assert read_plan(plan).beams
    # A deflated plan is a sixth of the size: 4 times as many of its bytes. A big-endian plan
    # parses as a little-endian one does (tests/test_plan_standard.py cuts those): half as many.
    # MQI_PLAN_CUT_STEP=1: every byte of both.
    coarse = max(1, CUT_STEP // 4) if syntax == DeflatedExplicitVRLittleEndian else 2 * CUT_STEP
    step = 1 if CUT_STEP == 1 else coarse
    whole_data_sets = whole_data_set_cuts(plan)
    for size in range(0, len(whole), step):
        plan.write_bytes(whole[:size])
        try:
            read_plan(plan)
        except CaseError as refused:
            assert str(refused).startswith(f"{plan}: "), str(refused)
        else:
            assert size in whole_data_sets, f"cut at {size} of {len(whole)} bytes read as a plan"


def test_rt_dose_declares_utf8_where_a_text_does_not_fit_the_plans_character_set(tmp_path: Path) -> None:
    """A Latin-1 plan and an engine label in Hangul: pydicom would write '?' for it in ISO_IR 100;
    the RT Dose declares ISO_IR 192 instead and every name stays the same."""
    case = write_case(tmp_path, LATIN1, "ISO_IR 100", ExplicitVRLittleEndian, "pydicom")
    label = "몬테카를로 MOQUI"
    out = rtdose.write_rtdose(
        np.ones(raw_dose.PLANE_2CM.shape),
        raw_dose.PLANE_2CM,
        find_plan(case),
        tmp_path,
        beam_number=3,
        engine_label=label,
        calibrated=False,
        bits=16,
    )
    ds = pydicom.dcmread(out)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.ManufacturerModelName == label and ds.SeriesDescription.endswith(f"{LATIN1.beams[1]}: {label}")
    assert str(ds.PatientName) == LATIN1.patient_name and ds.PatientID == LATIN1.patient_id
    assert ds["PatientName"].value.original_string == LATIN1.patient_name.encode("utf-8")
    if dciodvfy.tools() or dciodvfy.in_ci():
        dciodvfy.assert_conformant(out)


def test_beam_folder_names_of_non_ascii_beams() -> None:
    """ASCII names as mqi_interpreter makes them; any other character its code point, so Hangul
    names stay apart (they were all underscores, and two of a length collided)."""
    assert sanitize_beam_name("1G180:TX") == "1G180_TX"
    assert sanitize_beam_name("좌측 빔") == "uC88CuCE21_uBE54"
    assert sanitize_beam_name("우측 빔") == "uC6B0uCE21_uBE54"
    assert sanitize_beam_name("Schräg 1") == "Schru00E4g_1"
    assert sanitize_beam_name("\U0001f600") == "u1F600"


@pytest.mark.parametrize("encoding", ["bigendian", "deflated", "bigendian-dcmtk", "deflated-dcmtk"])
def test_tps_dose_in_any_transfer_syntax_reads_the_same(tmp_path: Path, encoding: str) -> None:
    syntax, writer = ENCODINGS[encoding]
    if writer == "dcmtk" and DCMCONV is None and not dciodvfy.in_ci():
        pytest.skip("dcmconv (Debian package dcmtk) not found: envs/setup.sh --dev")
    case = write_case(tmp_path, KOREAN, KOREAN_2022, ExplicitVRLittleEndian, "pydicom")
    tps = qa_gen.write_case_tps_doses(case, "G2")[0]
    other = encoded(tps, tmp_path / "other" / "RD_TPS.dcm", syntax, writer)
    first, second = rtdose_read.read_rtdose_dose(tps), rtdose_read.read_rtdose_dose(other)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
    assert np.count_nonzero(second.dose) > 0


def test_deflated_tps_dose_cut_short_is_an_error_naming_it(tmp_path: Path) -> None:
    case = write_case(tmp_path, KOREAN, KOREAN_2022, ExplicitVRLittleEndian, "pydicom")
    tps_doses = qa_gen.write_case_tps_doses(case, "G2")
    plan = pydicom.dcmread(find_plan(case))
    deflated = encoded(
        tps_doses[0], tps_doses[0].with_name("RD_TPS_2_deflated.dcm"), DeflatedExplicitVRLittleEndian, "pydicom"
    )
    tps_doses[0].unlink()
    assert match(find_tps_doses(case), plan.SOPInstanceUID, 2, 2) == deflated
    whole = deflated.read_bytes()
    deflated.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(TpsDoseProblem) as info:
        match(find_tps_doses(case), plan.SOPInstanceUID, 2, 2)
    assert info.value.kind == "ERROR"
    assert "no TPS RT Dose for beam 2" in info.value.reason
    assert f"{deflated.name}: cannot read DICOM (cut short or damaged?)" in info.value.reason
    # Beam 3's own dose is still found; with no TPS dose at all, the cut one is still named.
    assert match(find_tps_doses(case), plan.SOPInstanceUID, 3, 2) == tps_doses[1]
    tps_doses[1].unlink()
    with pytest.raises(TpsDoseProblem) as info:
        match(find_tps_doses(case), plan.SOPInstanceUID, 3, 2)
    assert info.value.kind == "ERROR" and deflated.name in info.value.reason
