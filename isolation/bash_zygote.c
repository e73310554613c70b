/* sandmill's warm bash: the native exec zygote (launcher.c) as a bash loadable builtin.
 *
 * The zygote is a bash that ran `enable -f THIS sandmill_zygote; sandmill_zygote SOCK
 * BASH [MOUNT_ROOT...]` (bash_zygote.py writes that script). The builtin serves the
 * zygote protocol as the launcher does; each job process is a clone of this bash, set up
 * by launcher.c's job() (namespaces, mounts, limits, fds). A job whose argv is
 * [BASH, SCRIPT, ARGS...] then runs SCRIPT in that clone, as `BASH SCRIPT ARGS` would
 * after its start: no exec, no dynamic loading, no shell start-up. Everything a fresh
 * bash derives at its start is made again for the job: its environment (exactly the job's),
 * $0, the positional parameters, $$ and PPID, SHLVL, PWD and OLDPWD, HOSTNAME, the RANDOM
 * seed, SECONDS' start, BASH_SOURCE, the script on fd 255, line numbers, the signal
 * dispositions bash set at its start. Any other job (another program, an option before the
 * script, a variable bash reads at its start in the job's environment) is exec'd as the
 * launcher does: the same guarantees, a fresh bash.
 */
#define SANDMILL_BASH_BUILTIN
#include <config.h>
#include <time.h>
#include <sys/time.h>

#include "builtins.h"
#include "shell.h"
#include "common.h"

/* bash's own, not in the installed headers */
extern int default_buffered_input;
extern int close_buffered_fd(int);
extern void with_input_from_buffered_stream(int, char *);
extern void set_pwd(void);
extern void seedrand(void);
extern time_t shell_start_time;
extern struct timeval shellstart;
extern int executing_builtin, builtin_ignoring_errexit, line_number, last_command_exit_value;
extern sh_builtin_func_t *this_shell_builtin, *last_shell_builtin;

static void become_bash(char **argv, char **env, char *buf);

#include "launcher.c"

static const char *bash_self; /* the bash this is: a job's argv[0] to run here */
static struct sigaction bash_actions[NSIG];
static sigset_t bash_mask;
static char *cmdline; /* the zygote's argv strings (/proc/self/cmdline), and their size */
static size_t cmdline_size;

/* Variables a bash reads at its start (options, functions, start-up files, its own
   counters): a job that sets one is exec'd, so that a fresh bash reads it. */
static const char *const STARTUP_VARS[] = {
    "SHELLOPTS", "POSIXLY_CORRECT", "POSIX_PEDANTIC", "ENV", "SHLVL", "PWD", "OLDPWD",
    "HOSTNAME", "IFS", "PS4", "OPTIND", "OPTERR", "TMOUT", "GLOBIGNORE", "FUNCNEST", "UID",
    "EUID", "PPID", "GROUPS", "RANDOM", "SRANDOM", "SECONDS", "LINENO", "EPOCHSECONDS",
    "EPOCHREALTIME", "HISTCMD", "DIRSTACK", "COMP_WORDBREAKS", "_", NULL};

static int plain_env(char **env) {
    int path = 0; /* without PATH a bash sets its own default at start */
    for (char **e = env; *e; e++) {
        path |= strncmp(*e, "PATH=", 5) == 0;
        char *eq = strchr(*e, '=');
        if (eq == NULL || eq == *e || strncmp(*e, "BASH", 4) == 0)
            return 0; /* BASH_ENV, BASH_FUNC_f%%, BASHOPTS, BASH_XTRACEFD, ... */
        for (char *c = *e; c < eq; c++)
            if (!(*c == '_' || (*c >= 'A' && *c <= 'Z') || (*c >= 'a' && *c <= 'z') ||
                  (c > *e && *c >= '0' && *c <= '9')))
                return 0; /* not a name: bash's own import rules */
        for (const char *const *v = STARTUP_VARS; *v; v++)
            if ((size_t)(eq - *e) == strlen(*v) && strncmp(*e, *v, eq - *e) == 0)
                return 0;
    }
    return path;
}

/* The job's environment, and nothing of the zygote's. */
static void set_environment(char **env) {
    SHELL_VAR **old = all_exported_variables();
    for (SHELL_VAR **v = old; v && *v; v++) {
        char *name = savestring((*v)->name);
        unbind_variable(name);
        stupidly_hack_special_variables(name);
        free(name);
    }
    free(old);
    for (char **e = env; *e; e++) {
        char *eq = strchr(*e, '=');
        *eq = '\0';
        SHELL_VAR *v = bind_variable(*e, eq + 1, 0);
        if (v)
            VSETATTR(v, att_exported);
        stupidly_hack_special_variables(*e);
        *eq = '=';
    }
}

/* What a bash sets at its start from where it runs. */
static void set_startup_state(const char *script) {
    char cwd[4096], host[256];
    adjust_shell_level(1);
    if (getcwd(cwd, sizeof cwd) != NULL)
        set_working_directory(cwd);
    set_pwd();
    if (gethostname(host, sizeof host - 1) == 0) {
        host[sizeof host - 1] = '\0';
        bind_variable("HOSTNAME", host, 0);
    }
    dollar_dollar_pid = getpid();
    set_ppid();
    seedrand();
    shell_start_time = time(NULL);
    gettimeofday(&shellstart, NULL);
    SHELL_VAR *src = find_variable("BASH_SOURCE");
    if (src && array_p(src))
        array_insert(array_cell(src), 0, (char *)script);
    array_needs_making = 1;
}

/* /proc/self/cmdline (ps) says the job's argv, as much of it as the zygote's held. */
static void set_cmdline(char **argv) {
    if (cmdline == NULL || cmdline_size == 0)
        return;
    size_t at = 0;
    memset(cmdline, 0, cmdline_size);
    for (char **a = argv; *a && at + 1 < cmdline_size; a++) {
        size_t n = strlen(*a) + 1;
        if (n > cmdline_size - 1 - at)
            n = cmdline_size - 1 - at;
        memcpy(cmdline + at, *a, n);
        at += n;
    }
}

static void find_cmdline(void) {
    char stat[4096];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, stat, sizeof stat - 1);
    if (fd >= 0)
        close(fd);
    if (n <= 0)
        return;
    stat[n] = '\0';
    char *p = strrchr(stat, ')'); /* the fields after the command name (which may hold spaces) */
    unsigned long start = 0, end = 0;
    for (int field = 2; p && *p; field++) {
        p = strchr(p + 1, ' ');
        if (p == NULL)
            return;
        if (field + 1 == 48)
            start = strtoul(p + 1, NULL, 10);
        else if (field + 1 == 49) {
            end = strtoul(p + 1, NULL, 10);
            break;
        }
    }
    if (start && end > start) {
        cmdline = (char *)start;
        cmdline_size = end - start;
    }
}

/* The builtin leaves the job's shell: `enable` and `type` do not know it. */
static void forget_builtin(void) {
    for (int i = 0; i < num_shell_builtins; i++)
        if (shell_builtins[i].name && strcmp(shell_builtins[i].name, "sandmill_zygote") == 0) {
            memmove(&shell_builtins[i], &shell_builtins[i + 1],
                    (num_shell_builtins - i) * sizeof shell_builtins[0]);
            num_shell_builtins--;
            break;
        }
}

/* In the job process, set up: run argv[1] here as `argv[0] argv[1] ARGS` would, or
   return (the job is exec'd). Never returns once it has begun. */
static void become_bash(char **argv, char **env, char *buf) {
    if (strcmp(argv[0], bash_self) != 0 || argv[1] == NULL || argv[1][0] == '-' ||
        argv[1][0] == '+' || !plain_env(env))
        return;
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0)
        return; /* a fresh bash says why, in its words */
    char sample[80];
    ssize_t n = read(fd, sample, sizeof sample);
    if (n < 0 || (n > 0 && check_binary_file(sample, (int)n)) || lseek(fd, 0, SEEK_SET) != 0) {
        close(fd);
        return;
    }
    close_buffered_fd(default_buffered_input); /* the zygote's script (already closed) */
    fd = move_to_high_fd(fd, 1, -1); /* where bash keeps its script: fd 255 */
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    for (int s = 1; s < NSIG; s++)
        sigaction(s, &bash_actions[s], NULL);
    sigprocmask(SIG_SETMASK, &bash_mask, NULL);

    set_environment(env);
    set_startup_state(argv[1]);
    bind_variable("_", argv[0], 0); /* as a bash started as argv[0] has it */
    set_cmdline(argv);
    free(dollar_vars[0]);
    dollar_vars[0] = savestring(argv[1]);
    WORD_LIST *args = NULL;
    for (char **a = argv + 2; *a; a++)
        args = make_word_list(make_word(*a), args);
    args = REVERSE_LIST(args, WORD_LIST *);
    remember_args(args, 1);
    dispose_words(args);
    default_buffered_input = fd;
    with_input_from_buffered_stream(fd, argv[1]);
    line_number = 0;
    free(argv);
    free(env);
    free(buf);
    forget_builtin();
    executing_builtin = builtin_ignoring_errexit = 0;
    this_shell_builtin = last_shell_builtin = NULL;
    reader_loop();
    exit_shell(last_command_exit_value);
}

static int sandmill_zygote_builtin(WORD_LIST *list) {
    static char *args[256];
    int n = 0;
    for (WORD_LIST *w = list; w && n < 255; w = w->next)
        args[n++] = w->word->word;
    if (n < 2) {
        builtin_error("usage: sandmill_zygote SOCKFD BASH [MOUNT_ROOT...]");
        return EX_USAGE;
    }
    bash_self = args[1];
    find_cmdline();
    roots = args + 2;
    nroots = n - 2;
    for (int s = 1; s < NSIG; s++)
        sigaction(s, NULL, &bash_actions[s]);
    sigprocmask(SIG_SETMASK, NULL, &bash_mask);
    exit(serve(atoi(args[0]))); /* the zygote ends here; its job processes run their scripts */
}

static char *sandmill_zygote_doc[] = {"sandmill's warm bash zygote (isolation/bash_zygote.c).", NULL};

struct builtin sandmill_zygote_struct = {
    "sandmill_zygote", sandmill_zygote_builtin, BUILTIN_ENABLED, sandmill_zygote_doc,
    "sandmill_zygote SOCKFD BASH [MOUNT_ROOT...]", 0};
