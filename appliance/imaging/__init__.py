"""Reading images (DICOM, PNG, JPEG, TIFF) and preparing them for a model."""
