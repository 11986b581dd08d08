"""Patient QA: TPS dose intake, gamma, delivery check, verdicts and the QA sheet."""
