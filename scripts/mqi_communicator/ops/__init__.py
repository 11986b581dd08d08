"""Operations: case state on disk, the status view, alerts and reprocessing."""
