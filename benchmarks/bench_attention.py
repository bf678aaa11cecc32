"""The attention benchmark: ``maskdsl.bench`` (installed with the package, behind ``maskdsl bench``).

    PYTHONPATH=$PWD python benchmarks/bench_attention.py --csv out.csv     # as documented in maskdsl/bench.py
"""
import sys

from maskdsl.bench import main

if __name__ == "__main__":
    sys.exit(main())
