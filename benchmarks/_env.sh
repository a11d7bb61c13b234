# Sourced by the benchmark scripts (run from the checkout's root): they work without an
# installed zsq, as on a bare GPU machine that gets a copy of the working tree. zsq's own source
# comes first on the import path, `zsq` is `python3 -m zsq` where no zsq command is installed,
# and the shared data default to ../shared/data, else the checkout's gpu_data/ (see
# gpu_steps.sh) when only that is there. Output folders are the scripts' RUNS, never OUT (the
# device tool's own folder, emptied before each of its calls).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! command -v zsq >/dev/null 2>&1; then
  zsq() { "${PYTHON:-python3}" -m zsq "$@"; }
  export -f zsq
fi
if [ -z "${ZSQ_SHARED_DATA:-}" ] && [ ! -d ../shared/data ] && [ -d gpu_data ]; then
  export ZSQ_SHARED_DATA="$PWD/gpu_data"
fi
