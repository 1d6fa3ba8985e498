"""tfacd training entry point (placeholder until the training-pipeline issue lands).

The quantization core is usable from Python today (see README.md). This script does not
train anything yet: it says so and exits with status 2 rather than pretend.
"""

import sys

MESSAGE = ("train_main.py: the training pipeline (data, YAML configs, float->QAT runs) is not "
           "implemented yet; see README.md for using tfacd from Python.")


def main() -> int:
    print(MESSAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
