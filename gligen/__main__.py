import sys

from gligen.training.cli import run

if __name__ == "__main__":
    sys.exit(run())
