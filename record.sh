#!/usr/bin/env bash
# record.sh: run a command and append a reproducibility record to <output_dir>/cli_logs.txt.
#
# Usage: bash record.sh [VAR=value ...] command [args ...]
#   e.g. bash record.sh CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=1 \
#          python3 -m torch.distributed.launch --nproc_per_node=1 run_pretrain.py ... --output_dir X --log_dir Y
#
# Leading words NAME=value become environment variables of the command (exported verbatim, never evaluated).
# The output dir is the last `--output_dir X` / `--output_dir=X` in the command (argparse keeps the last one),
# else ./output_dir; an empty one (`--output_dir=`, "don't save") records into ./cli_logs.txt. The record holds
# a header (date, host, user, cwd, git commit and dirty state of the repo
# holding this script, env vars, the shell-quoted command), the command's stdout+stderr (also shown on the
# terminal) and a footer with the exit status and elapsed time. Exits with the command's status; 2 on bad usage.
# PYTHONUNBUFFERED=1 is set unless given, so Python output reaches the log and terminal as it is printed.

set -u
set -o pipefail

usage() {
    echo "usage: bash record.sh [VAR=value ...] command [args ...]   (logs to <--output_dir>/cli_logs.txt)" >&2
}

env_words=()
while [[ $# -gt 0 && "$1" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do
    env_words+=("$1")
    shift
done
if [[ $# -eq 0 ]]; then
    usage
    exit 2
fi

output_dir="./output_dir"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --output_dir)
            if ((i + 1 < ${#args[@]})); then output_dir="${args[i + 1]}"; fi ;;
        --output_dir=*)
            output_dir="${args[i]#--output_dir=}" ;;
    esac
done
if [[ -z "$output_dir" ]]; then
    # `--output_dir=` / `--output_dir ''` tells the scripts not to save; the record still has to go somewhere
    log="./cli_logs.txt"
    echo "record.sh: --output_dir is empty (the run saves nothing); recording into $log" >&2
else
    if ! mkdir -p -- "$output_dir"; then
        echo "record.sh: cannot create --output_dir $output_dir; fix the path or its permissions" >&2
        exit 2
    fi
    log="$output_dir/cli_logs.txt"
fi

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"

git_state() {
    local commit dirty
    if ! commit="$(git -C "$script_dir" rev-parse HEAD 2>/dev/null)"; then
        echo "not a git repo ($script_dir)"
        return
    fi
    # Untracked files (outputs, demo data) do not change what runs, so only tracked changes count as dirty.
    dirty="$(git -C "$script_dir" status --porcelain --untracked-files=no 2>/dev/null | wc -l | tr -d ' ')"
    if [[ "$dirty" == "0" ]]; then
        echo "$commit (clean)"
    else
        echo "$commit (dirty: $dirty tracked files modified)"
    fi
}

quote_words() {
    local out="" w
    for w in "$@"; do out+="$(printf '%q' "$w") "; done
    echo "${out% }"
}

now_ns() {
    local t
    t="$(date +%s%N 2>/dev/null)"
    [[ "$t" =~ ^[0-9]+$ ]] || t="$(( $(date +%s) * 1000000000 ))"  # no %N (BSD date): whole seconds
    echo "$t"
}

{
    echo "===== record.sh start $(date -Iseconds 2>/dev/null || date) ====="
    echo "host:    $(hostname 2>/dev/null || uname -n)"
    echo "user:    ${USER:-$(id -un 2>/dev/null)}"
    echo "cwd:     $(pwd)"
    echo "git:     $(git_state)"
    if ((${#env_words[@]})); then
        echo "env:     $(quote_words "${env_words[@]}")"
    else
        echo "env:     (none given)"
    fi
    echo "command: $(quote_words "$@")"
    echo "-----"
} >>"$log"
echo "record.sh: logging to $log" >&2

start_ns="$(now_ns)"
# Ctrl-C reaches the whole process group: let the command handle it and keep recording. tee ignores SIGINT so the
# command's last words (e.g. a KeyboardInterrupt traceback) still reach the log, and the footer is written.
trap ':' INT
(
    for kv in "${env_words[@]+"${env_words[@]}"}"; do export "$kv"; done  # validated NAME=value: no evaluation
    [[ -n "${PYTHONUNBUFFERED+x}" ]] || export PYTHONUNBUFFERED=1
    exec "$@"
) 2>&1 | (trap '' INT; exec tee -a "$log")
status=${PIPESTATUS[0]}
trap - INT
end_ns="$(now_ns)"

elapsed_ms=$(( (end_ns - start_ns) / 1000000 ))
elapsed_s=$(( elapsed_ms / 1000 ))
elapsed="$(printf '%d.%03d s (%d:%02d:%02d)' $((elapsed_ms / 1000)) $((elapsed_ms % 1000)) \
    $((elapsed_s / 3600)) $((elapsed_s % 3600 / 60)) $((elapsed_s % 60)))"
echo "===== record.sh end $(date -Iseconds 2>/dev/null || date) exit_status=$status elapsed=$elapsed =====" >>"$log"
exit "$status"
