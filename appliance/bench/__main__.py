import sys

from appliance.bench.run import main

sys.exit(main())
