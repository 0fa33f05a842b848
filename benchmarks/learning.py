"""Learning benchmark (MoE rows vs dense at equal active parameters, through the CLI): same as the
`lightning-moe-bench-learning` command.

    python benchmarks/learning.py                                    # every row, seed 0, 600 steps
    python benchmarks/learning.py --rows dense,moe_top2_e8 --seeds 0,1,2 --jobs 2 --threads 1
    python benchmarks/learning.py --tiny --rows dense,moe_top2_e8    # smoke test
"""

from lightning_moe.bench.learning import main

if __name__ == "__main__":
    main()
