#!/usr/bin/env bash
# The study of docs/testbed.md ("The study"), in three stated commands. Two queues run side by side,
# one thread each (a 2-core machine); a rerun skips finished runs and continues an interrupted one.
# A run takes about 6.5 minutes on a 2-core AMD EPYC (fp32, two at a time), so the core about 1 h 45 min.
#   bash examples/testbed/study.sh core        # dar, online-dpo, rloo, grpo × seeds 1–8 on the learned proxy
#   bash examples/testbed/study.sh secondary   # dar_ratio 0, 25% noise (dar, online-dpo), DAR's shuffled control
#   bash examples/testbed/study.sh summary     # summary.json per folder (nothing retrained), then the page:
#   python examples/testbed/study.py --core runs/study --ratio0 runs/study-ratio0 --noise runs/study-noise25 \
#       --control runs/study-control --out runs/study-page
# Those three stages are the dev-set study: trained on examples/testbed/train.jsonl, the prompts the proxy was
# fitted on (issue 32 found the overlap), graded on the dev set. The study on the sealed test set:
#   bash examples/testbed/study.sh test        # examples/testbed/study.yaml: the core and DAR's control × seeds 1–12
#   bash examples/testbed/study.sh test-summary
# and the lag study on the same protocol (docs/testbed.md, "The lag study"): dar and rloo at async_steps 0, 1 and 2
#   bash examples/testbed/study.sh async       # 72 runs: each seed's six on one machine
#   bash examples/testbed/study.sh async-summary
# A run folder does not outlive its machine; its record in a summary.json does. docs/img/study/ keeps the
# summaries of the seeds run so far, and study.py merges them with new folders (docs/testbed.md has the command).
# The secondary arms go seed by seed and the noise arms in pairs, so a stage stopped early still
# leaves paired seeds; `summary` summarises the seeds finished in each folder.
set -euo pipefail
export OMP_NUM_THREADS=1
# the operating point: 128 requests (4 DAR steps), 24-token answers, lr 5e-5: KL near 5 at the budget,
# where seed noise is smallest (docs/testbed.md says how it was chosen, and the difference each pair can detect).
# fp32 on every CPU (--bf16 false): with `auto` a CPU with bf16 hardware trains in bf16, and its runs
# (their held-out answers too) differ from those of one without, so seeds run on two machines would not pair.
POINT=(--config examples/testbed/testbed.yaml --bf16 false --max_completion_length 24
       --annotation_budget 128 --eval_requests 64)
LEARNED=(--annotator examples/testbed/learned.yaml)
NOISY=(--annotator examples/testbed/learned_noise25.yaml)
run() { daralign compare "${POINT[@]}" "$@"; }
# the starting policy's held-out answers and scores are the same in every folder on the learned proxy
share_before() { mkdir -p "$1/.heldout_before" && cp -n runs/study/.heldout_before/*.json "$1/.heldout_before/"; }
ratio0() { run --seeds "$1" "${LEARNED[@]}" --algorithms dar --override dar:dar_ratio=0 --output_dir runs/study-ratio0; }
control() { run --seeds "$1" "${LEARNED[@]}" --algorithms dar --shuffle_rewards true --output_dir runs/study-control; }
noise_pair() {
  run --seeds "$1" "${NOISY[@]}" --algorithms online-dpo --output_dir runs/study-noise25
  run --seeds "$1" "${NOISY[@]}" --algorithms dar --output_dir runs/study-noise25
}
finished() {  # the seeds of $1/$2 whose run has finished (what compare skips), comma-separated
  local seeds=() s
  for s in $(seq 1 12); do [ -d "$1/$2/seed$s/final" ] && [ -f "$1/$2/seed$s/compare_run.json" ] && seeds+=("$s"); done
  (IFS=,; echo "${seeds[*]}")
}
finished_by_all() {  # the seeds of folder $1 that every method named after it finished, comma-separated
  local dir=$1 m; shift
  for m in "$@"; do finished "$dir" "$m" | tr , '\n'; done | sed '/^$/d' | sort -n | uniq -c | awk -v n=$# '$1 == n {print $2}' | paste -sd,
}
two_queues() { "$1" > "runs/study-$1.log" 2>&1 & local a=$!; "$2" > "runs/study-$2.log" 2>&1 & wait "$a" $!; }

core_a() { run --seeds 1,2,3,4,5,6,7,8 "${LEARNED[@]}" --algorithms dar,rloo --output_dir runs/study; }
core_b() { run --seeds 1,2,3,4,5,6,7,8 "${LEARNED[@]}" --algorithms online-dpo,grpo --output_dir runs/study; }
secondary_a() { for s in 1 2 3 4 5 6 7 8; do ratio0 $s; done; for s in 2 4 6 8; do noise_pair $s; done; }
secondary_b() { for s in 1 2 3 4; do control $s; done; for s in 1 3 5 7; do noise_pair $s; done
                for s in 5 6 7 8; do control $s; done; }

# The test-set study: the same point on study.yaml (prompts disjoint from the proxy's fit data, graded on the
# test set); seed by seed, so a session stopped early leaves whole seeds; DAR's control alternates queues.
TEST=(--config examples/testbed/study.yaml --annotation_budget 128 --eval_requests 64)
read -r -a TEST_SEEDS <<< "${STUDY_SEEDS:-1 2 3 4 5 6 7 8 9 10 11 12}"  # STUDY_SEEDS="6 7": those only (a later session)
test_control() {
  mkdir -p runs/study-test-control/.heldout_before
  cp -n runs/study-test/.heldout_before/*.json runs/study-test-control/.heldout_before/ 2>/dev/null || true
  daralign compare "${TEST[@]}" --seeds "$1" --algorithms dar --shuffle_rewards true --output_dir runs/study-test-control
}
test_a() { for s in "${TEST_SEEDS[@]}"; do
  daralign compare "${TEST[@]}" --seeds "$s" --algorithms dar,rloo --output_dir runs/study-test
  if (( s % 2 )); then test_control "$s"; fi; done; }
test_b() { for s in "${TEST_SEEDS[@]}"; do
  daralign compare "${TEST[@]}" --seeds "$s" --algorithms online-dpo,grpo --output_dir runs/study-test
  if (( s % 2 == 0 )); then test_control "$s"; fi; done; }

# The lag study (issue 33): dar and rloo at async_steps 0, 1 and 2 on the test-set study's protocol and seeds.
# A seed's six runs run on one machine, one after another (docs/testbed.md, "The lag study", amendment): in
# fp32 a run on an Intel Xeon does not reproduce the same run on an AMD EPYC, so the synchronous arms are
# run again beside the lagged ones rather than taken from the test-set study. Odd seeds in one queue, even
# in the other, so a session stopped early leaves whole seeds.
lag_seed() {
  local k
  for k in 0 1 2; do
    mkdir -p "runs/study-async$k/.heldout_before"
    cp -n runs/study-test/.heldout_before/*.json "runs/study-async$k/.heldout_before/" 2>/dev/null || true
    daralign compare "${TEST[@]}" --async_steps "$k" --seeds "$1" --algorithms dar,rloo --output_dir "runs/study-async$k"
  done; }
async_odd() { for s in "${TEST_SEEDS[@]}"; do if (( s % 2 )); then lag_seed "$s"; fi; done; }
async_even() { for s in "${TEST_SEEDS[@]}"; do if (( s % 2 == 0 )); then lag_seed "$s"; fi; done; }

mkdir -p runs
case "${1:-}" in
  core) two_queues core_a core_b ;;
  secondary) share_before runs/study-ratio0; share_before runs/study-control; two_queues secondary_a secondary_b ;;
  summary)
    run --seeds 1,2,3,4,5,6,7,8 "${LEARNED[@]}" --algorithms dar,online-dpo,rloo,grpo --output_dir runs/study
    run --seeds "$(finished runs/study-ratio0 dar)" "${LEARNED[@]}" --algorithms dar --override dar:dar_ratio=0 \
        --output_dir runs/study-ratio0
    run --seeds "$(finished runs/study-control dar)" "${LEARNED[@]}" --algorithms dar --shuffle_rewards true \
        --output_dir runs/study-control
    pairs=$(comm -12 <(finished runs/study-noise25 dar | tr , '\n') <(finished runs/study-noise25 online-dpo | tr , '\n') | paste -sd,)
    run --seeds "$pairs" "${NOISY[@]}" --algorithms dar,online-dpo --output_dir runs/study-noise25 ;;
  test) two_queues test_a test_b ;;
  test-summary)  # summary.json of the seeds each folder finished (nothing retrained)
    seeds=$(finished_by_all runs/study-test dar online-dpo rloo grpo)
    if [ -n "$seeds" ]; then
      daralign compare "${TEST[@]}" --seeds "$seeds" --algorithms dar,online-dpo,rloo,grpo --output_dir runs/study-test
    else echo "runs/study-test: no seed finished by all four methods" >&2; fi
    seeds=$(finished runs/study-test-control dar)
    if [ -n "$seeds" ]; then
      daralign compare "${TEST[@]}" --seeds "$seeds" --algorithms dar --shuffle_rewards true --output_dir runs/study-test-control
    else echo "runs/study-test-control: no finished seed" >&2; fi ;;
  async) two_queues async_odd async_even ;;
  async-summary)
    for k in 0 1 2; do
      seeds=$(finished_by_all "runs/study-async$k" dar rloo)
      if [ -z "$seeds" ]; then echo "runs/study-async$k: no seed finished by both methods" >&2; continue; fi
      daralign compare "${TEST[@]}" --async_steps "$k" --seeds "$seeds" --algorithms dar,rloo --output_dir "runs/study-async$k"
    done ;;
  *) echo "usage: bash examples/testbed/study.sh core | secondary | summary | test | test-summary | async | async-summary" >&2
     exit 2 ;;
esac
