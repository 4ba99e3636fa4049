import sys

from vllm2.cli import main

sys.exit(main())
