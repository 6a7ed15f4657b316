/* LD_PRELOAD=avx2_only.so: this process, every thread it starts and every program it runs sees a CPU
 * without AVX-512 (and without AMX), so that one AVX-512 machine measures the AVX2 case for every
 * library at once: oneDNN, XNNPACK, OpenBLAS, NumPy and PyTorch each pick their kernels from CPUID,
 * and ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY limit only some of them.
 *
 * How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, the `cpuid_fault` flag in /proc/cpuinfo)
 * makes every CPUID instruction raise SIGSEGV; the handler runs the real CPUID with faulting off,
 * clears the AVX-512 and AMX feature bits and resumes after the instruction. Faulting is inherited
 * by threads and reset by exec, where LD_PRELOAD sets it again. Built by
 * benchmarks/extract_throughput.py (`cc -O2 -shared -fPIC`); exits with status 70 and a line on
 * stderr where the CPU or the kernel cannot fault on CPUID. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static void emulate_cpuid(int signal_number, siginfo_t *info, void *context) {
    (void)info;
    greg_t *regs = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* not CPUID: a real fault, which kills as without the shim */
        signal(signal_number, SIG_DFL);
        return;
    }
    unsigned leaf = (unsigned)regs[REG_RAX], subleaf = (unsigned)regs[REG_RCX], a, b, c, d;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, subleaf, a, b, c, d);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && subleaf == 0) {
        /* AVX512 F, DQ, IFMA, PF, ER, CD, BW, VL */
        b &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
        /* AVX512 VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
        c &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
        /* AVX512 4VNNIW, 4FMAPS, VP2INTERSECT, FP16; AMX BF16, TILE, INT8 */
        d &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(23) | BIT(22) | BIT(24) | BIT(25));
    } else if (leaf == 7 && subleaf == 1) {
        a &= ~BIT(5); /* AVX512_BF16 */
    }
    regs[REG_RAX] = a;
    regs[REG_RBX] = b;
    regs[REG_RCX] = c;
    regs[REG_RDX] = d;
    regs[REG_RIP] += 2; /* CPUID is two bytes */
}

__attribute__((constructor)) static void hide_avx512(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = emulate_cpuid;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &action, NULL);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        perror("avx2_only.so: this CPU or kernel cannot fault on CPUID (no cpuid_fault in /proc/cpuinfo)");
        exit(70);
    }
}
