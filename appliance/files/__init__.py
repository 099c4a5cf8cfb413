"""Files on the box's disks: durable writes, the spools, content hashes, and what becomes of a file once scored."""
