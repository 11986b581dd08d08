"""P1: decides a case is ready, validates it, and maps each delivery folder and fraction to its plan beam (intake.json)."""
