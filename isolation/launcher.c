/* sandmill's native exec zygote: the warm path of exec'd programs (bash, any binary).
 *
 * It speaks the zygote protocol (isolation/README.md; zygote.py) for jobs that exec a program, so a job
 * process is a clone of this small static process, not of a Python interpreter: the
 * clone copies a few pages instead of an interpreter's address space, and the exec
 * tears down almost nothing (docs/performance.md, "Round 7").
 * Runs inside the sandbox (nsjail, or the process backend's namespaces), as the job uid.
 *
 *   argv: launcher SOCKFD [MOUNT_ROOT...]
 *   zygote -> worker  R                  ready (the kernel attaches our pid)
 *   worker -> zygote  M + 1..8 fds       move into the job cgroup whose tasks (v1) or
 *                                        cgroup.procs (v2) files these are; then "m"
 *   worker -> zygote  F + 1 fd           clone a job process now, with this socket
 *   zygote -> worker  Z<seq><status>     job process number seq ended (two native ints)
 * and over each job process's own socket:
 *   job    -> worker  W                  cloned and waiting for its job (with its pid)
 *   worker -> job     K<fields> + 3 fds  the job (fields below); stdin/out/err
 *   job    -> worker  E<text>            set-up failed (nothing of the job ran)
 *
 * K's fields, each ending in a NUL: dir, mount, tmp_bytes (decimal, "" for none),
 * hostname ("" for none), N then N x (resource, soft, hard) in decimal, N then N argv
 * strings, N then N "KEY=VALUE" strings. A job with read-only mounts of its own goes
 * to the Python zygote instead (warm.py): each job process here only masks the mount
 * roots (an empty read-only tmpfs over each), so no job sees another one's environment.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define SETUP_FAILED 121
#define MAX_CHILDREN 64
#define MAX_MSG (1 << 20)
#define MAX_ITEMS 4096
#define MAX_MOVE_FDS 8

static char **roots;
static int nroots;

/* A set-up error on the job's socket, then the end of this job process. */
static void fail(int sock, const char *fmt, ...) {
    char buf[4000];
    va_list ap;
    int e = errno;
    buf[0] = 'E';
    va_start(ap, fmt);
    int n = vsnprintf(buf + 1, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    if (e)
        n += snprintf(buf + 1 + n, sizeof buf - 1 - n, ": %s", strerror(e));
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    send(sock, buf, 1 + n, MSG_NOSIGNAL);
    _exit(SETUP_FAILED);
}

static void write_file(int sock, const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        fail(sock, "write %s", path);
    close(fd);
}

static void do_mount(int sock, const char *src, const char *target, const char *type,
                     unsigned long flags, const char *data) {
    if (mount(src, target, type, flags, data) != 0)
        fail(sock, "mount %s", target);
}

/* A cursor over K's NUL-terminated fields. */
struct fields {
    char *p, *end;
    int sock;
};

static char *next_field(struct fields *f) {
    char *s = f->p;
    char *nul = s < f->end ? memchr(s, '\0', f->end - s) : NULL;
    if (nul == NULL) {
        errno = 0;
        fail(f->sock, "bad job message: truncated");
    }
    f->p = nul + 1;
    return s;
}

static unsigned long long next_num(struct fields *f, unsigned long long max) {
    char *s = next_field(f), *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (*s == '\0' || *end != '\0' || errno || v > max) {
        errno = 0;
        fail(f->sock, "bad job message: number %.40s", s);
    }
    return v;
}

/* N, then N strings, as a NULL-terminated array (for execve). */
static char **next_list(struct fields *f) {
    unsigned long long n = next_num(f, MAX_ITEMS);
    char **v = calloc(n + 1, sizeof *v);
    if (v == NULL)
        fail(f->sock, "calloc");
    for (unsigned long long i = 0; i < n; i++)
        v[i] = next_field(f);
    return v;
}

/* The job process: pid 1 of its namespaces. Set up, wait for the job, exec it. */
static void job(int sock, uid_t uid, gid_t gid) {
    char map[64];
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    /* Non-dumpable (inherited from the zygote), its /proc/self files would belong to a uid not
       mapped here and the maps could not be written. */
    prctl(PR_SET_DUMPABLE, 1);
    write_file(sock, "/proc/self/setgroups", "deny");
    snprintf(map, sizeof map, "%u %u 1", uid, uid);
    write_file(sock, "/proc/self/uid_map", map);
    snprintf(map, sizeof map, "%u %u 1", gid, gid);
    write_file(sock, "/proc/self/gid_map", map);
    do_mount(sock, NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL);
    do_mount(sock, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    for (int i = 0; i < nroots; i++) {
        struct stat st;
        if (stat(roots[i], &st) != 0 || !S_ISDIR(st.st_mode))
            continue; /* not in this sandbox: nothing to hide */
        do_mount(sock, "tmpfs", roots[i], "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                 "size=64k,nr_inodes=256,mode=755");
        do_mount(sock, NULL, roots[i], NULL,
                 MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    }
    if (send(sock, "W", 1, MSG_NOSIGNAL) != 1)
        _exit(SETUP_FAILED);

    char *buf = malloc(MAX_MSG);
    union {
        char space[CMSG_SPACE(3 * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {buf, MAX_MSG};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = ctl.space, .msg_controllen = sizeof ctl.space};
    if (buf == NULL)
        fail(sock, "malloc");
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n <= 0)
        _exit(SETUP_FAILED); /* the worker is gone */
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    int fds[3];
    errno = 0;
    if (buf[0] != 'K' || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || c == NULL ||
        c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
        c->cmsg_len != CMSG_LEN(3 * sizeof(int)))
        fail(sock, "bad job message");
    memcpy(fds, CMSG_DATA(c), sizeof fds);

    struct fields f = {buf + 1, buf + n, sock};
    char *dir = next_field(&f), *mount_at = next_field(&f);
    char *tmp_bytes = next_field(&f), *hostname = next_field(&f);
    unsigned long long nrl = next_num(&f, 64);
    struct {
        int res;
        struct rlimit lim;
    } rl[64];
    for (unsigned long long i = 0; i < nrl; i++) {
        rl[i].res = (int)next_num(&f, RLIM_NLIMITS - 1);
        rl[i].lim.rlim_cur = next_num(&f, ~0ULL);
        rl[i].lim.rlim_max = next_num(&f, ~0ULL);
    }
    char **argv = next_list(&f), **env = next_list(&f);
    if (argv[0] == NULL) {
        errno = 0;
        fail(sock, "bad job message: no argv");
    }

    /* Our dir over the shared jobs dir: the job sees only its own files there. */
    int here = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (here < 0)
        fail(sock, "open %s", dir);
    char self_fd[64];
    snprintf(self_fd, sizeof self_fd, "/proc/self/fd/%d", here);
    do_mount(sock, self_fd, mount_at, NULL, MS_BIND, NULL);
    close(here);
    char tmp[96] = "mode=1777";
    if (*tmp_bytes)
        snprintf(tmp, sizeof tmp, "mode=1777,size=%s", tmp_bytes);
    do_mount(sock, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp);
    struct stat st;
    if (stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode))
        do_mount(sock, "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, tmp);
    if (*hostname && sethostname(hostname, strlen(hostname)) != 0)
        fail(sock, "sethostname");
    if (chdir(mount_at) != 0)
        fail(sock, "chdir %s", mount_at);
    for (unsigned long long i = 0; i < nrl; i++)
        if (setrlimit(rl[i].res, &rl[i].lim) != 0)
            fail(sock, "setrlimit %d", rl[i].res);
    /* No capability in our user namespace (an exec as a non-zero uid would clear the
       permitted set anyway; cleared here so nothing depends on that). */
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &hdr, data) != 0)
        fail(sock, "capset");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        fail(sock, "prctl no_new_privs");
    for (int i = 0; i < 3; i++)
        if (fds[i] < 3 || dup2(fds[i], i) < 0) /* ours are all above 2: 0-2 are taken */
            fail(sock, "dup2");
    /* Every other fd closed, our socket too: its end tells the worker the job's code runs.
       (Signals: all at their defaults and none blocked, as the zygote set them once.) */
    if (syscall(SYS_close_range, 3, ~0U, 0) != 0)
        for (int fd = 3; fd < 65536; fd++)
            close(fd);
#ifdef SANDMILL_BASH_BUILTIN
    become_bash(argv, env, buf); /* returns when this job is not ours to run in this bash */
#endif
    execve(argv[0], argv, env);
    dprintf(2, "sandmill: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

struct child {
    int pidfd, pid, seq;
};

/* M: "0" into each cgroup file passed: this (single-threaded) process moves itself, which
   on cgroup v1 takes no global lock (a move by pid waits, now and then, for an RCU grace
   period that stalls every fork and exit on the host). A failed move ends us: a clone
   must never be born in the wrong cgroup. */
static void move_self(int sock, struct cmsghdr *c) {
    size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    int fds[MAX_MOVE_FDS];
    memcpy(fds, CMSG_DATA(c), nfds * sizeof(int));
    int ok = 1;
    for (size_t i = 0; i < nfds; i++) {
        if (write(fds[i], "0", 1) != 1)
            ok = 0;
        close(fds[i]);
    }
    if (!ok || send(sock, "m", 1, MSG_NOSIGNAL) != 1)
        _exit(1);
}

static void send_status(int sock, int seq, int status) {
    char z[1 + 2 * sizeof(int)];
    z[0] = 'Z';
    memcpy(z + 1, &seq, sizeof seq);
    memcpy(z + 1 + sizeof seq, &status, sizeof status);
    send(sock, z, sizeof z, MSG_NOSIGNAL);
}

/* The zygote: forks job processes on F, moves itself on M, reports their ends. */
static int serve(int sock) {
    uid_t uid = getuid();
    gid_t gid = getgid();
    /* Every signal at its default and none blocked, once here, so that each job process
       inherits them (an exec keeps ignored ones): SIGCHLD's keeps our children ours to
       reap; our sends use MSG_NOSIGNAL instead of an ignored SIGPIPE. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int s = 1; s < NSIG; s++)
        sigaction(s, &dfl, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    prctl(PR_SET_DUMPABLE, 0); /* no same-uid process may ptrace or read our memory */
    if (send(sock, "R", 1, MSG_NOSIGNAL) != 1)
        return 1;
    struct child kids[MAX_CHILDREN];
    int nkids = 0, seq = 0;
    struct pollfd pfd[MAX_CHILDREN + 1];
    for (;;) {
        pfd[0] = (struct pollfd){sock, POLLIN | POLLRDHUP, 0};
        for (int i = 0; i < nkids; i++)
            pfd[i + 1] = (struct pollfd){kids[i].pidfd, POLLIN, 0};
        if (poll(pfd, nkids + 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        for (int i = nkids - 1; i >= 0; i--) {
            if (!pfd[i + 1].revents)
                continue;
            int status = 0;
            waitpid(kids[i].pid, &status, 0);
            close(kids[i].pidfd);
            send_status(sock, kids[i].seq, status);
            kids[i] = kids[--nkids];
        }
        if (pfd[0].revents & (POLLRDHUP | POLLHUP | POLLERR))
            _exit(0); /* the worker is gone: our job processes die with us */
        if (!(pfd[0].revents & POLLIN))
            continue;
        char m[16];
        union {
            char space[CMSG_SPACE(MAX_MOVE_FDS * sizeof(int))];
            struct cmsghdr align;
        } ctl;
        struct iovec iov = {m, sizeof m};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = ctl.space, .msg_controllen = sizeof ctl.space};
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n == 0)
            _exit(0);
        if (n < 0)
            continue;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        if (c == NULL || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        if (n == 1 && m[0] == 'M') {
            move_self(sock, c);
            continue;
        }
        int job_sock;
        memcpy(&job_sock, CMSG_DATA(c), sizeof job_sock);
        if (n != 1 || m[0] != 'F' || c->cmsg_len != CMSG_LEN(sizeof(int)) || nkids == MAX_CHILDREN) {
            close(job_sock);
            continue;
        }
        seq++;
        /* Straight into the new namespaces: pid 1 of its pid namespace, no intermediate. */
        long pid = syscall(SYS_clone, CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC |
                                          CLONE_NEWUTS | SIGCHLD, 0, 0, 0, 0);
        if (pid == 0) {
            close(sock);
            job(job_sock, uid, gid); /* never returns */
        }
        if (pid < 0) {
            char e[200];
            int len = snprintf(e, sizeof e, "EOSError: clone: %s", strerror(errno));
            send(job_sock, e, len, MSG_NOSIGNAL);
            close(job_sock);
            send_status(sock, seq, SETUP_FAILED << 8);
            continue;
        }
        close(job_sock);
        int pidfd = (int)syscall(SYS_pidfd_open, (int)pid, 0);
        if (pidfd < 0)
            return 1; /* cannot watch it: the worker sees us gone and starts over */
        kids[nkids++] = (struct child){pidfd, (int)pid, seq};
    }
}

#ifndef SANDMILL_BASH_BUILTIN
int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s SOCKFD [MOUNT_ROOT...]\n", argv[0]);
        return 2;
    }
    roots = argv + 2;
    nroots = argc - 2;
    return serve(atoi(argv[1]));
}
#endif
