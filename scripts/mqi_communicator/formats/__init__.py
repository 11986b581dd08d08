"""File formats the pipeline reads and writes (plan, PTN log, MOQUI CSV and parameter files, raw dose, RT Dose), with no case logic."""
