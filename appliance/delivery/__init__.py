"""Ways out: results in the forms other systems read (DICOM structured reports for the PACS)."""
