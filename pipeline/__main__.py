import sys

from pipeline.cli import main

if __name__ == "__main__":  # loader processes started by forkserver import this module too
    sys.exit(main())
