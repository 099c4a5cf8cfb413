"""The journal (SQLite): inputs, results and what became of each file."""
