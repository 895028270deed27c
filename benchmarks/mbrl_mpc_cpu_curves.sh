#!/usr/bin/env bash
# Learning curves of mbrl_mpc.py's CPU configuration (docs/mbrl_mpc.md): 3 seeds each, one run at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
CPU="--population-size 100 --num-elites 10 --num-particles 5 --horizon 15 --cem-iterations 3 --model-epochs 25 --eval-episodes 1"
for seed in 1 2 3; do
  python mbrl_mpc.py --env-id InvertedPendulum-v5 --exp-name cpu --seed $seed --total-timesteps 2000 \
      --trial-length 200 --init-random-episodes 10 $CPU
done
for seed in 1 2 3; do
  python mbrl_mpc.py --env-id HalfCheetah-v5 --exp-name cpu --seed $seed --total-timesteps 4000 $CPU --eval-episodes 0
done
python benchmarks/plot_curves.py --runs "runs/InvertedPendulum-v5__cpu__*" \
    --csv benchmarks/results/mbrl_mpc_InvertedPendulum-v5_cpu.csv --png docs/img/mbrl_mpc_InvertedPendulum-v5_cpu.png \
    --title "mbrl_mpc.py CPU config, InvertedPendulum-v5 (200-step episodes)"
python benchmarks/plot_curves.py --runs "runs/HalfCheetah-v5__cpu__*" \
    --csv benchmarks/results/mbrl_mpc_HalfCheetah-v5_cpu.csv --png docs/img/mbrl_mpc_HalfCheetah-v5_cpu.png \
    --title "mbrl_mpc.py CPU config, HalfCheetah-v5 (1000-step episodes)"
