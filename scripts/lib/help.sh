# Sourced by the scripts beside it: `help_if_asked "$@"` prints the calling
# script's header comment (from its second line to `set -euo pipefail`) and
# exits when the first argument is -h or --help.
help_if_asked() {
  if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"
    exit 0
  fi
}
