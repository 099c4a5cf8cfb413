"""Put summarize.py's table into RESULTS.md in place of its RESULTS_TABLE marker or previous table."""

import re
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
table = subprocess.run([sys.executable, str(here / "summarize.py")], capture_output=True, text=True, check=True).stdout
path = here / "RESULTS.md"
text = path.read_text()
if "RESULTS_TABLE" in text:
    text = text.replace("RESULTS_TABLE", table.strip())
else:
    text = re.sub(r"\| model \|.*?\n(?=\n)", table.strip() + "\n", text, count=1, flags=re.S)
path.write_text(text)
