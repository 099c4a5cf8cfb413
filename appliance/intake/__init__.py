"""Ways in: every input, from any source, goes through one Intake.submit."""
