// tests/cuda_emu/emu_streams.cc: stream order for the CUDA emulator (what and why: emu_streams.h).
//
// A created stream is a queue of operations (a kernel grid, a copy, a memset, a host function, a free, a
// wait for another stream's event). An operation runs only when some call needs it: then the stream's
// queue runs up to it, in order, in the calling thread. An event's record is a mark in its stream's
// count of operations: complete once that many have run. A wait for an event is an operation that, when
// its stream reaches it, runs the event's stream up to the mark; a mark is taken when the wait is queued,
// so waits point back in time and never form a cycle.
//
// One recursive lock covers the queues and the marks and is held while queued work runs: one thread runs
// device work at a time (as emu_device.cc's lock already makes it), and the wait operation re-enters it.
// Locks: the runtime's own (emu_runtime.cc) is never held when it calls here; an operation may take it.
#include "emu_streams.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

struct Op {
    void (*fn)(void *);
    void *arg;
};

struct Queue {
    std::deque<Op> ops;
    unsigned long long queued = 0, done = 0; // operations ever queued; the first `done` of them have run
    bool blocking = false;                   // not cudaStreamNonBlocking: the legacy stream waits for it
};

// Complete once `stream` has run `seq` operations; a null stream: complete.
struct Mark {
    cudaStream_t stream;
    unsigned long long seq;
};

// Never destroyed (the module is never unloaded, and a static destructor of a test may still free).
std::recursive_mutex &mu = *new std::recursive_mutex;
std::unordered_map<const void *, Queue> &queues = *new std::unordered_map<const void *, Queue>;
std::unordered_map<const void *, Mark> &marks = *new std::unordered_map<const void *, Mark>;

bool is_default(cudaStream_t s) { return !s || s == cudaStreamLegacy || s == cudaStreamPerThread; }
bool is_legacy(cudaStream_t s) { return !s || s == cudaStreamLegacy; }

// Runs q's operations until `seq` of them have run. Under mu. An operation is counted once it has
// returned; one that waits runs other queues, whose marks on q are all at or before it (see the top).
void run_to(Queue &q, unsigned long long seq) {
    while (q.done < seq && !q.ops.empty()) {
        Op op = q.ops.front();
        q.ops.pop_front();
        op.fn(op.arg);
        q.done++;
    }
}

int run_all(bool blocking_only) {
    std::lock_guard<std::recursive_mutex> g(mu);
    std::vector<Queue *> qs;
    for (auto &kv : queues)
        if (!blocking_only || kv.second.blocking) qs.push_back(&kv.second);
    int ran = 0;
    for (Queue *q : qs) {
        ran |= q->done < q->queued;
        run_to(*q, q->queued);
    }
    return ran;
}

void run_mark(const Mark &m) {
    auto it = queues.find(m.stream);
    if (it != queues.end()) run_to(it->second, m.seq);
}

void wait_op(void *arg) {
    Mark *m = static_cast<Mark *>(arg);
    run_mark(*m);
    delete m;
}

} // namespace

extern "C" {

int dsmoe_emu_deferred(void) {
    static const bool deferred = [] {
        const char *v = getenv("DSMOE_EMU_STREAMS");
        if (!v || !*v || !strcmp(v, "deferred")) return true;
        if (!strcmp(v, "immediate")) return false;
        fprintf(stderr, "dsmoe cuda emulator: DSMOE_EMU_STREAMS='%s' is neither deferred nor immediate: deferred\n", v);
        return true;
    }();
    return deferred;
}

int dsmoe_emu_defers(cudaStream_t stream) {
    if (!dsmoe_emu_deferred() || is_default(stream)) return 0;
    std::lock_guard<std::recursive_mutex> g(mu);
    return queues.count(stream) != 0;
}

void dsmoe_emu_enqueue(cudaStream_t stream, void (*fn)(void *), void *arg) {
    std::lock_guard<std::recursive_mutex> g(mu);
    if (dsmoe_emu_defers(stream)) {
        Queue &q = queues[stream];
        q.ops.push_back(Op{fn, arg});
        q.queued++;
        return;
    }
    if (is_legacy(stream)) run_all(true); // the legacy stream waits for the blocking streams
    fn(arg);
}

int dsmoe_emu_drain(cudaStream_t stream) {
    if (is_default(stream)) return is_legacy(stream) ? run_all(true) : 0;
    std::lock_guard<std::recursive_mutex> g(mu);
    auto it = queues.find(stream);
    if (it == queues.end()) return 0;
    int ran = it->second.done < it->second.queued;
    run_to(it->second, it->second.queued);
    return ran;
}

int dsmoe_emu_drain_all(void) { return run_all(false); }

void dsmoe_emu_stream_created(cudaStream_t stream, int blocking) {
    std::lock_guard<std::recursive_mutex> g(mu);
    Queue &q = queues[stream];
    q = Queue();
    q.blocking = blocking != 0;
}

void dsmoe_emu_stream_destroyed(cudaStream_t stream) {
    std::lock_guard<std::recursive_mutex> g(mu);
    auto it = queues.find(stream);
    if (it == queues.end()) return;
    run_to(it->second, it->second.queued);
    queues.erase(it);
}

void dsmoe_emu_event_record(cudaEvent_t event, cudaStream_t stream) {
    if (is_legacy(stream)) run_all(true);
    std::lock_guard<std::recursive_mutex> g(mu);
    marks[event] = dsmoe_emu_defers(stream) ? Mark{stream, queues[stream].queued} : Mark{nullptr, 0};
}

int dsmoe_emu_event_complete(cudaEvent_t event, int run_to_it) {
    std::lock_guard<std::recursive_mutex> g(mu);
    auto m = marks.find(event);
    if (m == marks.end() || !m->second.stream) return 1;
    auto q = queues.find(m->second.stream);
    if (q == queues.end() || q->second.done >= m->second.seq) return 1;
    if (run_to_it) run_to(q->second, m->second.seq);
    return 0;
}

void dsmoe_emu_event_destroyed(cudaEvent_t event) {
    std::lock_guard<std::recursive_mutex> g(mu);
    marks.erase(event);
}

void dsmoe_emu_stream_wait_event(cudaStream_t stream, cudaEvent_t event) {
    std::lock_guard<std::recursive_mutex> g(mu);
    auto m = marks.find(event);
    if (m == marks.end() || !m->second.stream) return; // never recorded, or complete when recorded
    if (dsmoe_emu_defers(stream)) dsmoe_emu_enqueue(stream, wait_op, new Mark(m->second));
    else run_mark(m->second); // work on a default stream runs at once: the event's work first
}

} // extern "C"
