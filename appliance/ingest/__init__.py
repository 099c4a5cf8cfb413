"""Getting files from the scanner's folder into the journal, exactly once."""
