/* Presents this CPU to a process as one without AVX-512, VNNI, AVX512-BF16 or AMX (or, with
 * CPUID_MASK=amx, as one without AMX alone: an AVX-512 VNNI CPU).
 *
 * LD_PRELOAD this library and every CPUID instruction in the process (numpy, torch, oneDNN, fbgemm,
 * onnxruntime's MLAS) faults (Linux ARCH_SET_CPUID, needs the `cpuid_fault` flag); the SIGSEGV handler
 * runs the real CPUID, clears the feature bits above and steps over the instruction. The libraries then
 * pick the kernels they pick on an AVX2-only CPU. It is a benchmark harness (bench/avx2/run), not part
 * of the product.
 *
 * - The setting is per thread and inherited by threads and forked children; execve clears it, and the
 *   library sets it again in each new program, except the JVM (whose own SIGSEGV use is left alone;
 *   bench/avx2/run caps it with -XX:UseAVX=2).
 * - sigaction/signal for SIGSEGV are interposed: the program's handler is kept and called for every
 *   fault that is not a CPUID, so faulthandler and friends work as before.
 * - CPUIDS_LOG=path appends "pid exe count" at exit: how many CPUIDs were trapped (a hot-path CPUID
 *   would show as a large count).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_GET_CPUID
#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012
#endif

static struct sigaction app_segv;      /* the program's own SIGSEGV disposition */
static int active;
static volatile long trapped;

static long set_cpuid(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on); }

static void real_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static int amx_only; /* CPUID_MASK=amx: hide AMX alone (a VNNI CPU without AMX) */

static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (amx_only) {
        if (leaf == 7 && sub == 0) r[3] &= ~((1u << 22) | (1u << 24) | (1u << 25)); /* amx_bf16, tile, int8 */
        else if (leaf == 7 && sub == 1) r[0] &= ~(1u << 21);                        /* amx_fp16 */
        else if (leaf == 0x1d || leaf == 0x1e) r[0] = r[1] = r[2] = r[3] = 0;       /* AMX tile leaves */
        return;
    }
    if (leaf == 7 && sub == 0) {
        /* EBX: avx512f 16, dq 17, ifma 21, pf 26, er 27, cd 28, bw 30, vl 31 */
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) |
                  (1u << 31));
        /* ECX: avx512_vbmi 1, vbmi2 6, avx512_vnni 11, bitalg 12, vpopcntdq 14 */
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4vnniw 2, 4fmaps 3, vp2intersect 8, amx_bf16 22, avx512_fp16 23, amx_tile 24, amx_int8 25 */
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: avx_vnni 4, avx512_bf16 5, amx_fp16 21; EDX: avx_vnni_int8 4, avx10 19 */
        r[0] &= ~((1u << 4) | (1u << 5) | (1u << 21));
        r[3] &= ~((1u << 4) | (1u << 19));
    } else if (leaf == 0x24) {
        r[0] = r[1] = r[2] = r[3] = 0; /* AVX10 leaf */
    }
}

static void on_segv(int sig, siginfo_t *info, void *vctx) {
    ucontext_t *uc = (ucontext_t *)vctx;
    greg_t *g = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (info->si_code == SI_KERNEL && ip && ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t r[4];
        uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX];
        set_cpuid(1);
        real_cpuid(leaf, sub, r);
        set_cpuid(0);
        mask(leaf, sub, r);
        g[REG_RAX] = r[0];
        g[REG_RBX] = r[1];
        g[REG_RCX] = r[2];
        g[REG_RDX] = r[3];
        g[REG_RIP] += 2;
        __atomic_add_fetch(&trapped, 1, __ATOMIC_RELAXED);
        return;
    }
    /* not ours: hand it to the program's handler, or die as the default would */
    if (app_segv.sa_flags & SA_SIGINFO) {
        if (app_segv.sa_sigaction) { app_segv.sa_sigaction(sig, info, vctx); return; }
    } else if (app_segv.sa_handler != SIG_DFL && app_segv.sa_handler != SIG_IGN) {
        app_segv.sa_handler(sig);
        return;
    }
    signal(SIGSEGV, SIG_DFL);
    raise(SIGSEGV);
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    static int (*next)(int, const struct sigaction *, struct sigaction *);
    if (!next) next = dlsym(RTLD_NEXT, "sigaction");
    if (active && sig == SIGSEGV) {
        if (old) *old = app_segv;
        if (act) app_segv = *act;
        return 0;
    }
    return next(sig, act, old);
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    sigemptyset(&act.sa_mask);
    act.sa_flags = SA_RESTART;
    if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

static char exe[256];

static void report(void) {
    const char *log = getenv("CPUIDS_LOG");
    if (!log) return;
    FILE *f = fopen(log, "a");
    if (!f) return;
    fprintf(f, "%d %s %ld\n", (int)getpid(), exe, trapped);
    fclose(f);
}

__attribute__((constructor)) static void start(void) {
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n > 0 ? n : 0] = 0;
    const char *base = strrchr(exe, '/');
    base = base ? base + 1 : exe;
    if (strcmp(base, "java") == 0) return;
    const char *which = getenv("CPUID_MASK");
    amx_only = which && strcmp(which, "amx") == 0;
    struct sigaction act;
    memset(&act, 0, sizeof act);
    act.sa_sigaction = on_segv;
    act.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&act.sa_mask);
    int (*next)(int, const struct sigaction *, struct sigaction *) = dlsym(RTLD_NEXT, "sigaction");
    if (next(SIGSEGV, &act, &app_segv) != 0 || set_cpuid(0) != 0) {
        fprintf(stderr, "cpuid_mask: CPUID faulting is not available here (needs the cpuid_fault flag)\n");
        _exit(3);
    }
    active = 1;
    atexit(report);
}
