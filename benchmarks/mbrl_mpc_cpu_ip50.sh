#!/usr/bin/env bash
# The documented small CPU command of mbrl_mpc.py (50-step InvertedPendulum-v5 episodes), 3 seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
for seed in 1 2 3; do
  python mbrl_mpc.py --env-id InvertedPendulum-v5 --exp-name cpu50 --seed $seed --total-timesteps 500 --trial-length 50 \
      --init-random-episodes 10 --population-size 100 --num-elites 10 --num-particles 5 --horizon 15 \
      --cem-iterations 3 --model-epochs 25
done
python benchmarks/plot_curves.py --runs "runs/InvertedPendulum-v5__cpu50__*" \
    --csv benchmarks/results/mbrl_mpc_InvertedPendulum-v5_cpu50.csv --png docs/img/mbrl_mpc_InvertedPendulum-v5_cpu50.png \
    --title "mbrl_mpc.py CPU config, InvertedPendulum-v5 (50-step episodes)"
