"""P3: a MOQUI raw dose written as a DICOM RT Dose in the frame it was computed in."""
