"""What every room shares: errors, the manifest, faults."""
