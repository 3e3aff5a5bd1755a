# tests/held_signal.sh (sourced): a signal delivered while the processes that should get it are held
# with SIGSTOP. A test that sends a walltime signal mid-run must not race the run: a tiny run ends in
# under a second, and a signal's path (a launcher forwarding it, a loaded machine scheduling the test
# script late) can take longer than that. A stopped process keeps a caught signal pending, so the test
# stops the ranks, sends the signal, waits until /proc shows it pending at every rank it should reach,
# and continues them: the run then stops at the step it was held in, however slow the path was. launch
# starts such a run with its ranks' PIDs where hold can find them.

# signal_pending <pid> <signal name>: the signal waits in the process's pending sets (SigPnd: the thread
# group's main thread; ShdPnd: the process's shared set).
signal_pending() {
  local bit m
  bit=$((1 << ($(kill -l "$2") - 1)))
  for m in $(awk '/^(SigPnd|ShdPnd):/ { print $2 }' "/proc/$1/status" 2>/dev/null); do
    [ $((0x$m & bit)) != 0 ] && return 0
  done
  return 1
}

# wait_pending <signal name> <seconds> <pid>...: until the signal is pending at every pid; sets
# `pending` to how many it is pending at, and returns 0 when that is all of them.
wait_pending() {
  local sig=$1 tenths=$(($2 * 10)) p i
  shift 2
  for i in $(seq "$tenths"); do
    pending=0
    for p in "$@"; do signal_pending "$p" "$sig" && pending=$((pending + 1)); done
    [ $pending = $# ] && return 0
    sleep 0.1
  done
  return 1
}

# stopped_now <pid>: every thread of the process is stopped (state T). SIGSTOP is delivered
# asynchronously: a signal sent before the stop has taken effect can still be handled at once, and then
# it is never pending.
stopped_now() {
  local t
  for t in /proc/"$1"/task/*; do
    [ "$(awk '/^State:/ { print $2 }' "$t/status" 2>/dev/null)" = T ] || return 1
  done
  [ -d "/proc/$1" ]
}

# held: the PIDs stopped now. Whatever a test does, its exit trap calls release_held, so that no rank
# stays stopped behind a failed check. hold returns once every one of them is stopped (1: one has
# ended, or is not stopped after 30 s).
held=
hold() {
  local p i
  held="$*"
  kill -STOP "$@" || return 1
  for p in "$@"; do
    for i in $(seq 300); do stopped_now "$p" && break; sleep 0.1; done
    stopped_now "$p" || return 1
  done
}
release_held() { [ -z "$held" ] || kill -CONT $held 2>/dev/null; held=; }

# launch <ranks> <log> args...: "$dsmoe" "$deck" args in the background (a singleton for 1 rank, else
# "$mpiexec" "${mpiflags[@]}"); each rank writes its pid to <log>.pid.<rank>, for hold and kill. Sets
# $pid to the launcher's (or the singleton's) pid.
launch() {
  local ranks=$1 log=$2
  shift 2
  if [ "$ranks" = 1 ]; then
    bash -c 'echo $$ >"$0.pid.0"; exec "$@"' "$log" "$dsmoe" "$deck" "$@" >"$log" 2>&1 &
  else
    "$mpiexec" "${mpiflags[@]}" -n "$ranks" bash -c 'echo $$ >"$0.pid.$OMPI_COMM_WORLD_RANK"; exec "$@"' \
      "$log" "$dsmoe" "$deck" "$@" >"$log" 2>&1 &
  fi
  pid=$!
}
