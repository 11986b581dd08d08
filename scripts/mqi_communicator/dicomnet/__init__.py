"""DICOM over the network: the Storage SCP that stages plans and TPS doses, C-ECHO, and the sender of finished cases' RT Doses."""
