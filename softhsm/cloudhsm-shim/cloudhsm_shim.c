/*
 * cloudhsm_shim.c - a PKCS#11 module that behaves like AWS CloudHSM's Client SDK 5 library, over
 * SoftHSM2. hsmbridge's CI runs its `cloudhsm` profile through it.
 *
 * It exports C_GetFunctionList, loads a private copy of SoftHSM2 (so a process that also loads
 * SoftHSM2 directly keeps two independent instances), forwards every call
 * and imposes what CloudHSM's library does differently:
 *
 *   - C_Login(CKU_USER) takes "USERNAME:password". A bare password fails (CKR_PIN_INCORRECT); a
 *     user the cluster does not have fails with CKR_USER_PIN_NOT_INITIALIZED. Failed logins are
 *     counted per cluster and user in files shared by every process; at the threshold the user is
 *     locked (CKR_PIN_LOCKED, no attempt reaches the HSM) until an officer resets its password
 *     (the stand-in `cloudhsm-cli` next to this file). Officer logins (CKU_SO) are refused:
 *     CloudHSM's PKCS#11 library serves crypto users only.
 *   - Crypto users' passwords are the cluster's, as on CloudHSM, where a change is seen by every
 *     process at once. SoftHSM2 cannot do that with its user PIN: a process keeps the PIN it read
 *     at C_Initialize, accepting the old one and refusing the new one after a change until it
 *     re-initialises. So a user is one of two kinds (a line of the cluster's `users` file):
 *       "NAME"                      passthrough: the password is SoftHSM2's user PIN, given to
 *                                   SoftHSM2's C_Login as it is (the form of a fresh cluster);
 *       "NAME SALT_HEX SHA256_HEX"  a password record: SHA256_HEX = hex(SHA-256(SALT || NAME ||
 *                                   ":" || password)), SALT 16 random bytes. The shim computes the
 *                                   digest with the real module (C_Digest on the caller's
 *                                   session, which needs no login) and compares in constant time:
 *                                   a mismatch counts a failure and answers CKR_PIN_INCORRECT
 *                                   without reaching SoftHSM2's C_Login; a match logs in to
 *                                   SoftHSM2 with the cluster's own PIN from `token-pin`.
 *     `token-pin` is written once (by cloudhsm-cli, or `hsmbridge init`) and never changed, so no
 *     process's copy of SoftHSM2 goes stale; a missing or refused token-pin, or a malformed line,
 *     answers CKR_GENERAL_ERROR with a line on stderr and counts no failure. (The one re-keying
 *     is an admin reset on a cluster that has no token-pin yet: see cloudhsm_cli.py.)
 *   - Each process logged in as a user is recorded, so a password change can see that the user
 *     is logged in elsewhere.
 *   - AES-GCM encryption ignores the caller's IV: pIv must point at 12 zero bytes; the HSM draws
 *     the IV and writes it into that buffer. Any other IV is CKR_MECHANISM_PARAM_INVALID.
 *   - A failed GCM tag check answers CKR_ENCRYPTED_DATA_INVALID (SoftHSM2 says
 *     CKR_GENERAL_ERROR).
 *   - Single-part AES-GCM C_Encrypt/C_Decrypt refuse more than 16 KB with CKR_DATA_LEN_RANGE.
 *   - C_InitToken, C_InitPIN, C_SetPIN, C_SeedRandom, C_SetAttributeValue, C_CopyObject and
 *     C_GetObjectSize answer CKR_FUNCTION_NOT_SUPPORTED.
 *   - Key templates may only use the attributes CloudHSM documents for generation
 *     (CKR_TEMPLATE_INCONSISTENT otherwise); reading an attribute it does not support answers
 *     CKR_ATTRIBUTE_TYPE_INVALID for that attribute.
 *   - One slot per cluster: with `token_label` set only that token's slot is listed.
 *   - A search sees keys other processes made since (SoftHSM2 alone may not: move_generation),
 *     and never a key a killed process left half-written (half_made).
 *
 * Configuration: the file named by HSMBRIDGE_SHIM_CONF ("key = value" lines, read at
 * C_Initialize; relative paths are relative to the file):
 *   target            the real module (default /usr/lib/softhsm/libsofthsm2.so)
 *   state_dir         cross-process state, per cluster in STATE/<token label>/ (the label with
 *                     '/' as '_'), read and written under an flock of its `.lock`:
 *                       users                  one crypto user a line, "NAME" or "NAME SALT_HEX
 *                                              SHA256_HEX" (above); the first line naming a
 *                                              user counts; missing: only kmsuser, passthrough
 *                       token-pin              SoftHSM2's user PIN (one trailing newline
 *                                              ignored), mode 0600; needed by record users
 *                       failed-logins/<user>   the failed logins in a row
 *                       logins/<user>.<pid>    a process logged in as the user
 *   token_label       the cluster's token; unset: every SoftHSM2 slot is listed
 *   lockout_threshold failed logins in a row that lock a user (CloudHSM: 5; 0: never)
 *   faults            a file re-read whenever it changes, with any of
 *                       throttle_rate = 0.25        CKR_FUNCTION_FAILED for that share of calls
 *                                                   that start an operation, make a key or draw
 *                                                   random bytes (CloudHSM's "HSM busy")
 *                       latency_ms = 20             added before every forwarded call
 *                       down = 1                    every HSM call answers CKR_DEVICE_REMOVED and
 *                                                   no slot has a token (all HSMs gone)
 *                       key_availability_fails = 1  token-key generation answers
 *                                                   CKR_FUNCTION_FAILED (the key is on fewer than
 *                                                   two HSMs)
 * Without HSMBRIDGE_SHIM_CONF (or without state_dir): SoftHSM2 at its Debian path, only kmsuser,
 * passthrough, failed logins counted in this process only, every slot listed, no faults.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define EXPORT __attribute__((visibility("default")))
#define GCM_IV_BYTES 12
#define GCM_SINGLE_PART_MAX (16 * 1024)
#define MAX_USER 31
#define MAX_LABEL 32
#define SESSION_SLOTS 4096
#define SALT_BYTES 16
#define DIGEST_BYTES 32
#define TOKEN_PIN_MAX 255 /* SoftHSM2's longest PIN */

/* ---- configuration ----------------------------------------------------------------------- */

static struct {
    char target[PATH_MAX];
    char state_dir[PATH_MAX / 2]; /* room for the cluster and file names after it */
    char token_label[MAX_LABEL + 1];
    char faults[PATH_MAX];
    int lockout_threshold;
} conf;

static struct {
    double throttle_rate;
    long latency_ms;
    int down;
    int key_availability_fails;
    struct timespec mtime;
    int present;
} faults;

static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
static CK_FUNCTION_LIST_PTR real;
static CK_FUNCTION_LIST shim;
static void *real_handle;
static unsigned int throttle_seed = 1;

/* The logged-in user of this process (login is per application in PKCS#11). */
static struct {
    int logged_in;
    char user[MAX_USER + 1];
    char token[MAX_LABEL + 1];
    long open_sessions;
} login;

/* Failed logins per user when there is no state directory. */
static struct {
    char key[MAX_LABEL + MAX_USER + 2];
    int count;
} local_failures[64];

/* Per-session: is the active encrypt/decrypt operation AES-GCM? */
static struct {
    CK_SESSION_HANDLE handle;
    unsigned char gcm_encrypt, gcm_decrypt;
} sessions[SESSION_SLOTS];

static void trim(char *s) {
    char *end = s + strlen(s);
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n' || end[-1] == '\r'))
        *--end = '\0';
    char *start = s;
    while (*start == ' ' || *start == '\t')
        start++;
    if (start != s)
        memmove(s, start, strlen(start) + 1);
}

static void resolve(char *out, size_t size, const char *base_dir, const char *value) {
    if (value[0] == '/' || base_dir[0] == '\0')
        snprintf(out, size, "%s", value);
    else
        snprintf(out, size, "%s/%s", base_dir, value);
}

/* Calls fn(key, value) for each "key = value" line of path; returns -1 if it cannot be read. */
static int read_settings(const char *path, void (*fn)(const char *, const char *, const char *)) {
    FILE *fh = fopen(path, "r");
    if (fh == NULL)
        return -1;
    char base[PATH_MAX];
    snprintf(base, sizeof base, "%s", path);
    char *slash = strrchr(base, '/');
    if (slash != NULL)
        *slash = '\0';
    else
        base[0] = '\0';
    char line[PATH_MAX + 64];
    while (fgets(line, sizeof line, fh) != NULL) {
        char *hash = strchr(line, '#');
        if (hash != NULL)
            *hash = '\0';
        char *eq = strchr(line, '=');
        if (eq == NULL)
            continue;
        *eq = '\0';
        char *key = line, *value = eq + 1;
        trim(key);
        trim(value);
        fn(base, key, value);
    }
    fclose(fh);
    return 0;
}

static void conf_setting(const char *base, const char *key, const char *value) {
    if (strcmp(key, "target") == 0)
        resolve(conf.target, sizeof conf.target, base, value);
    else if (strcmp(key, "state_dir") == 0)
        resolve(conf.state_dir, sizeof conf.state_dir, base, value);
    else if (strcmp(key, "token_label") == 0)
        snprintf(conf.token_label, sizeof conf.token_label, "%s", value);
    else if (strcmp(key, "faults") == 0)
        resolve(conf.faults, sizeof conf.faults, base, value);
    else if (strcmp(key, "lockout_threshold") == 0)
        conf.lockout_threshold = atoi(value);
}

static void fault_setting(const char *base, const char *key, const char *value) {
    (void)base;
    if (strcmp(key, "throttle_rate") == 0)
        faults.throttle_rate = atof(value);
    else if (strcmp(key, "latency_ms") == 0)
        faults.latency_ms = atol(value);
    else if (strcmp(key, "down") == 0)
        faults.down = atoi(value);
    else if (strcmp(key, "key_availability_fails") == 0)
        faults.key_availability_fails = atoi(value);
}

static void load_conf(void) {
    memset(&conf, 0, sizeof conf);
    snprintf(conf.target, sizeof conf.target, "/usr/lib/softhsm/libsofthsm2.so");
    conf.lockout_threshold = 5;
    const char *path = getenv("HSMBRIDGE_SHIM_CONF");
    if (path != NULL && path[0] != '\0' && read_settings(path, conf_setting) != 0)
        fprintf(stderr, "cloudhsm-shim: cannot read %s: %s\n", path, strerror(errno));
}

/* Re-reads the faults file when its modification time changed. Caller holds state_lock. */
static void refresh_faults(void) {
    if (conf.faults[0] == '\0')
        return;
    struct stat st;
    if (stat(conf.faults, &st) != 0) {
        if (faults.present)
            memset(&faults, 0, sizeof faults);
        return;
    }
    if (faults.present && st.st_mtim.tv_sec == faults.mtime.tv_sec &&
        st.st_mtim.tv_nsec == faults.mtime.tv_nsec)
        return;
    memset(&faults, 0, sizeof faults);
    read_settings(conf.faults, fault_setting);
    faults.mtime = st.st_mtim;
    faults.present = 1;
}

/* Applies the current faults before a forwarded call: the added latency, then `down`. */
static CK_RV before_call(int starts_work) {
    pthread_mutex_lock(&state_lock);
    refresh_faults();
    long latency = faults.latency_ms;
    int down = faults.down;
    int throttled = starts_work && faults.throttle_rate > 0 &&
                    (double)rand_r(&throttle_seed) / RAND_MAX < faults.throttle_rate;
    pthread_mutex_unlock(&state_lock);
    if (latency > 0) {
        struct timespec ts = {latency / 1000, (latency % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
    }
    if (down)
        return CKR_DEVICE_REMOVED;
    return throttled ? CKR_FUNCTION_FAILED : CKR_OK;
}

#define GUARD(starts_work)                                                                        \
    do {                                                                                          \
        CK_RV guard_rv = before_call(starts_work);                                                \
        if (guard_rv != CKR_OK)                                                                   \
            return guard_rv;                                                                      \
    } while (0)

/* ---- per-session operation flags ---------------------------------------------------------- */

static void session_flags(CK_SESSION_HANDLE h, int which, int gcm) {
    pthread_mutex_lock(&state_lock);
    unsigned idx = (unsigned)(h % SESSION_SLOTS);
    if (sessions[idx].handle != h) {
        sessions[idx].handle = h;
        sessions[idx].gcm_encrypt = sessions[idx].gcm_decrypt = 0;
    }
    if (which == 0)
        sessions[idx].gcm_encrypt = (unsigned char)gcm;
    else
        sessions[idx].gcm_decrypt = (unsigned char)gcm;
    pthread_mutex_unlock(&state_lock);
}

static int session_is_gcm(CK_SESSION_HANDLE h, int which) {
    pthread_mutex_lock(&state_lock);
    unsigned idx = (unsigned)(h % SESSION_SLOTS);
    int gcm = sessions[idx].handle == h &&
              (which == 0 ? sessions[idx].gcm_encrypt : sessions[idx].gcm_decrypt);
    pthread_mutex_unlock(&state_lock);
    return gcm;
}

/* ---- cross-process login state ------------------------------------------------------------ */

static int valid_name(const char *s, size_t max) {
    size_t n = strlen(s);
    if (n == 0 || n > max)
        return 0;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '_' || *p == '-' || *p == '.'))
            return 0;
    return s[0] != '.';
}

/* The token label of the slot a session belongs to, as a path-safe name. */
static CK_RV session_token(CK_SESSION_HANDLE h, char *out) {
    CK_SESSION_INFO info;
    CK_RV rv = real->C_GetSessionInfo(h, &info);
    if (rv != CKR_OK)
        return rv;
    CK_TOKEN_INFO token;
    rv = real->C_GetTokenInfo(info.slotID, &token);
    if (rv != CKR_OK)
        return rv;
    memcpy(out, token.label, MAX_LABEL);
    out[MAX_LABEL] = '\0';
    trim(out);
    for (char *p = out; *p; p++)
        if (*p == '/')
            *p = '_';
    if (out[0] == '\0' || out[0] == '.')
        snprintf(out, MAX_LABEL + 1, "token-%lu", (unsigned long)info.slotID);
    return CKR_OK;
}

static void cluster_path(char *out, size_t size, const char *token, const char *leaf) {
    snprintf(out, size, "%s/%s/%s", conf.state_dir, token, leaf);
}

static void make_dirs(const char *token) {
    char path[PATH_MAX];
    mkdir(conf.state_dir, 0700);
    cluster_path(path, sizeof path, token, "");
    mkdir(path, 0700);
    cluster_path(path, sizeof path, token, "failed-logins");
    mkdir(path, 0700);
    cluster_path(path, sizeof path, token, "logins");
    mkdir(path, 0700);
}

/* An exclusive lock on the cluster's state, held across a read-modify-write; -1 if none. */
static int lock_cluster(const char *token) {
    if (conf.state_dir[0] == '\0')
        return -1;
    make_dirs(token);
    char path[PATH_MAX];
    cluster_path(path, sizeof path, token, ".lock");
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0)
        while (flock(fd, LOCK_EX) != 0 && errno == EINTR)
            ;
    return fd;
}

static void unlock_cluster(int fd) {
    if (fd >= 0)
        close(fd); /* releases the flock */
}

/* How the cluster knows a crypto user (a line of STATE/<token>/users). */
enum user_kind {
    USER_MISSING,     /* no line names it */
    USER_PASSTHROUGH, /* "NAME": its password is SoftHSM2's user PIN */
    USER_RECORD,      /* "NAME SALT_HEX SHA256_HEX": its password is checked here */
    USER_MALFORMED,   /* a line names it, but the rest is neither of those */
};

struct password_record {
    unsigned char salt[SALT_BYTES];
    unsigned char digest[DIGEST_BYTES];
};

/* Decodes exactly `n` bytes of hex (either case) from `hex`, which must hold 2n digits. */
static int unhex(const char *hex, unsigned char *out, size_t n) {
    if (strlen(hex) != 2 * n)
        return -1;
    for (size_t i = 0; i < 2 * n; i++) {
        char c = hex[i];
        int v = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (v < 0)
            return -1;
        if (i % 2 == 0)
            out[i / 2] = (unsigned char)(v << 4);
        else
            out[i / 2] |= (unsigned char)v;
    }
    return 0;
}

/* The first line naming `user` decides (fields separated by blanks; blank lines are skipped). */
static enum user_kind find_user(const char *token, const char *user, struct password_record *rec) {
    if (conf.state_dir[0] == '\0')
        return strcmp(user, "kmsuser") == 0 ? USER_PASSTHROUGH : USER_MISSING;
    char path[PATH_MAX];
    cluster_path(path, sizeof path, token, "users");
    FILE *fh = fopen(path, "r");
    if (fh == NULL)
        return strcmp(user, "kmsuser") == 0 ? USER_PASSTHROUGH : USER_MISSING;
    char *line = NULL;
    size_t cap = 0;
    enum user_kind kind = USER_MISSING;
    while (kind == USER_MISSING && getline(&line, &cap, fh) >= 0) {
        char *fields[4], *save = NULL;
        int n = 0;
        for (char *f = strtok_r(line, " \t\r\n", &save); f != NULL && n < 4;
             f = strtok_r(NULL, " \t\r\n", &save))
            fields[n++] = f;
        if (n == 0 || strcmp(fields[0], user) != 0)
            continue;
        if (n == 1)
            kind = USER_PASSTHROUGH;
        else if (n == 3 && unhex(fields[1], rec->salt, SALT_BYTES) == 0 &&
                 unhex(fields[2], rec->digest, DIGEST_BYTES) == 0)
            kind = USER_RECORD;
        else
            kind = USER_MALFORMED;
    }
    free(line);
    fclose(fh);
    return kind;
}

/* SHA-256(salt || user || ":" || password), computed by the real module on `session` (a digest
 * needs no login). */
static CK_RV password_digest(CK_SESSION_HANDLE session, const unsigned char *salt,
                             const char *user, const char *password,
                             unsigned char out[DIGEST_BYTES]) {
    unsigned char buf[SALT_BYTES + MAX_USER + 1 + 128];
    size_t user_len = strlen(user), password_len = strlen(password);
    if (user_len > MAX_USER || password_len > 128)
        return CKR_ARGUMENTS_BAD;
    memcpy(buf, salt, SALT_BYTES);
    memcpy(buf + SALT_BYTES, user, user_len);
    buf[SALT_BYTES + user_len] = ':';
    memcpy(buf + SALT_BYTES + user_len + 1, password, password_len);
    CK_MECHANISM mech = {CKM_SHA256, NULL, 0};
    CK_RV rv = real->C_DigestInit(session, &mech);
    CK_ULONG out_len = DIGEST_BYTES;
    if (rv == CKR_OK)
        rv = real->C_Digest(session, buf, SALT_BYTES + user_len + 1 + password_len, out,
                            &out_len);
    if (rv == CKR_OK && out_len != DIGEST_BYTES)
        rv = CKR_GENERAL_ERROR;
    explicit_bzero(buf, sizeof buf);
    return rv;
}

static int same_bytes(const unsigned char *a, const unsigned char *b, size_t n) {
    volatile unsigned char diff = 0; /* constant time: every byte is compared */
    for (size_t i = 0; i < n; i++)
        diff |= (unsigned char)(a[i] ^ b[i]);
    return diff == 0;
}

/* The cluster's SoftHSM2 user PIN from STATE/<token>/token-pin (one trailing newline dropped);
 * its length, or -1 with a line on stderr. */
static long read_token_pin(const char *token, char *out, size_t size) {
    char path[PATH_MAX];
    cluster_path(path, sizeof path, token, "token-pin");
    int fd = conf.state_dir[0] ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0) {
        fprintf(stderr,
                "cloudhsm-shim: cannot read %s: %s (users with a password record need it)\n",
                path, conf.state_dir[0] ? strerror(errno) : "no state_dir");
        return -1;
    }
    char buf[TOKEN_PIN_MAX + 2];
    ssize_t n = read(fd, buf, sizeof buf);
    close(fd);
    if (n > 0 && buf[n - 1] == '\n')
        n--;
    if (n <= 0 || n > TOKEN_PIN_MAX || (size_t)n >= size) {
        fprintf(stderr, "cloudhsm-shim: %s holds no usable PIN\n", path);
        explicit_bzero(buf, sizeof buf);
        return -1;
    }
    memcpy(out, buf, (size_t)n);
    out[n] = '\0';
    explicit_bzero(buf, sizeof buf);
    return (long)n;
}

static int *local_counter(const char *token, const char *user) {
    char key[sizeof local_failures[0].key];
    snprintf(key, sizeof key, "%s/%s", token, user);
    for (size_t i = 0; i < sizeof local_failures / sizeof local_failures[0]; i++) {
        if (strcmp(local_failures[i].key, key) == 0)
            return &local_failures[i].count;
        if (local_failures[i].key[0] == '\0') {
            snprintf(local_failures[i].key, sizeof local_failures[i].key, "%s", key);
            return &local_failures[i].count;
        }
    }
    return &local_failures[0].count;
}

static int read_failures(const char *token, const char *user) {
    if (conf.state_dir[0] == '\0')
        return *local_counter(token, user);
    char path[PATH_MAX], leaf[64];
    snprintf(leaf, sizeof leaf, "failed-logins/%s", user);
    cluster_path(path, sizeof path, token, leaf);
    FILE *fh = fopen(path, "r");
    if (fh == NULL)
        return 0;
    int count = 0;
    if (fscanf(fh, "%d", &count) != 1)
        count = 0;
    fclose(fh);
    return count;
}

static void write_failures(const char *token, const char *user, int count) {
    if (conf.state_dir[0] == '\0') {
        *local_counter(token, user) = count;
        return;
    }
    char path[PATH_MAX], leaf[64];
    snprintf(leaf, sizeof leaf, "failed-logins/%s", user);
    cluster_path(path, sizeof path, token, leaf);
    if (count == 0) {
        unlink(path);
        return;
    }
    FILE *fh = fopen(path, "w");
    if (fh != NULL) {
        fprintf(fh, "%d\n", count);
        fclose(fh);
    }
}

static void login_marker(const char *token, const char *user, int present) {
    if (conf.state_dir[0] == '\0')
        return;
    char path[PATH_MAX], leaf[96];
    snprintf(leaf, sizeof leaf, "logins/%s.%ld", user, (long)getpid());
    cluster_path(path, sizeof path, token, leaf);
    if (present) {
        int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        if (fd >= 0)
            close(fd);
    } else {
        unlink(path);
    }
}

static void logged_out(void) {
    pthread_mutex_lock(&state_lock);
    if (login.logged_in)
        login_marker(login.token, login.user, 0);
    login.logged_in = 0;
    pthread_mutex_unlock(&state_lock);
}

/* ---- overridden functions ----------------------------------------------------------------- */

static CK_RV shim_Initialize(CK_VOID_PTR args) {
    load_conf();
    memset(&faults, 0, sizeof faults);
    memset(&login, 0, sizeof login);
    memset(sessions, 0, sizeof sessions);
    throttle_seed = (unsigned int)getpid() ^ (unsigned int)time(NULL);
    return real->C_Initialize(args);
}

static CK_RV shim_Finalize(CK_VOID_PTR reserved) {
    logged_out();
    return real->C_Finalize(reserved);
}

static CK_RV shim_GetInfo(CK_INFO_PTR info) {
    CK_RV rv = real->C_GetInfo(info);
    if (rv == CKR_OK) {
        memset(info->libraryDescription, ' ', sizeof info->libraryDescription);
        memcpy(info->libraryDescription, "CloudHSM SDK 5 stand-in", 23);
    }
    return rv;
}

static int slot_shown(CK_SLOT_ID slot) {
    if (conf.token_label[0] == '\0')
        return 1;
    CK_TOKEN_INFO token;
    if (real->C_GetTokenInfo(slot, &token) != CKR_OK)
        return 0;
    char label[MAX_LABEL + 1];
    memcpy(label, token.label, MAX_LABEL);
    label[MAX_LABEL] = '\0';
    trim(label);
    return strcmp(label, conf.token_label) == 0;
}

static CK_RV shim_GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR list, CK_ULONG_PTR count) {
    CK_RV rv = before_call(0);
    if (rv == CKR_DEVICE_REMOVED) { /* all HSMs gone: the slot stays, without a token */
        if (present) {
            *count = 0;
            return CKR_OK;
        }
    } else if (rv != CKR_OK) {
        return rv;
    }
    if (conf.token_label[0] == '\0')
        return real->C_GetSlotList(present, list, count);
    CK_ULONG n = 0;
    rv = real->C_GetSlotList(CK_TRUE, NULL, &n);
    if (rv != CKR_OK)
        return rv;
    CK_SLOT_ID *all = calloc(n ? n : 1, sizeof *all);
    if (all == NULL)
        return CKR_HOST_MEMORY;
    rv = real->C_GetSlotList(CK_TRUE, all, &n);
    CK_ULONG shown = 0;
    for (CK_ULONG i = 0; rv == CKR_OK && i < n; i++) {
        if (!slot_shown(all[i]))
            continue;
        if (list != NULL && shown >= *count) {
            rv = CKR_BUFFER_TOO_SMALL;
            break;
        }
        if (list != NULL)
            list[shown] = all[i];
        shown++;
    }
    free(all);
    if (rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL)
        *count = shown;
    return rv;
}

static CK_RV shim_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info) {
    if (before_call(0) == CKR_DEVICE_REMOVED)
        return CKR_TOKEN_NOT_PRESENT;
    if (!slot_shown(slot))
        return CKR_SLOT_ID_INVALID;
    return real->C_GetTokenInfo(slot, info);
}

static CK_RV shim_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
                              CK_SESSION_HANDLE_PTR session) {
    GUARD(0);
    if (!slot_shown(slot))
        return CKR_SLOT_ID_INVALID;
    CK_RV rv = real->C_OpenSession(slot, flags, app, notify, session);
    if (rv == CKR_OK) {
        pthread_mutex_lock(&state_lock);
        login.open_sessions++;
        pthread_mutex_unlock(&state_lock);
        session_flags(*session, 0, 0);
        session_flags(*session, 1, 0);
    }
    return rv;
}

/* PKCS#11: closing the last session of a slot ends the application's login there. */
static void session_closed(long n) {
    int last;
    pthread_mutex_lock(&state_lock);
    login.open_sessions -= n;
    if (login.open_sessions < 0)
        login.open_sessions = 0;
    last = login.open_sessions == 0;
    pthread_mutex_unlock(&state_lock);
    if (last)
        logged_out();
}

static CK_RV shim_CloseSession(CK_SESSION_HANDLE session) {
    CK_RV rv = real->C_CloseSession(session);
    if (rv == CKR_OK)
        session_closed(1);
    return rv;
}

static CK_RV shim_CloseAllSessions(CK_SLOT_ID slot) {
    CK_RV rv = real->C_CloseAllSessions(slot);
    if (rv == CKR_OK)
        session_closed(LONG_MAX);
    return rv;
}

static CK_RV shim_Login(CK_SESSION_HANDLE session, CK_USER_TYPE type, CK_UTF8CHAR_PTR pin,
                        CK_ULONG pin_len) {
    GUARD(0);
    if (type != CKU_USER)
        return CKR_USER_TYPE_INVALID; /* officers work through cloudhsm-cli, not PKCS#11 */
    if (pin == NULL || pin_len == 0 || pin_len > 128)
        return CKR_PIN_INCORRECT;
    char given[129];
    memcpy(given, pin, pin_len);
    given[pin_len] = '\0';
    char *colon = strchr(given, ':');
    if (colon == NULL)
        return CKR_PIN_INCORRECT; /* a bare password names no crypto user */
    *colon = '\0';
    const char *user = given, *password = colon + 1;
    if (!valid_name(user, MAX_USER))
        return CKR_USER_PIN_NOT_INITIALIZED;
    char token[MAX_LABEL + 1];
    CK_RV rv = session_token(session, token);
    if (rv != CKR_OK)
        return rv;
    int fd = lock_cluster(token);
    struct password_record rec;
    enum user_kind kind = find_user(token, user, &rec);
    if (kind == USER_MISSING) {
        unlock_cluster(fd);
        return CKR_USER_PIN_NOT_INITIALIZED;
    }
    int failures = read_failures(token, user);
    if (conf.lockout_threshold > 0 && failures >= conf.lockout_threshold) {
        unlock_cluster(fd);
        return CKR_PIN_LOCKED;
    }
    char token_pin[TOKEN_PIN_MAX + 1];
    if (kind == USER_MALFORMED) {
        fprintf(stderr, "cloudhsm-shim: the users file of %s has a malformed line for %s\n",
                token, user);
        rv = CKR_GENERAL_ERROR;
    } else if (kind == USER_RECORD) {
        /* The cluster checks the password; SoftHSM2 gets the cluster's own PIN. */
        unsigned char digest[DIGEST_BYTES];
        rv = password_digest(session, rec.salt, user, password, digest);
        if (rv == CKR_OK && !same_bytes(digest, rec.digest, DIGEST_BYTES)) {
            write_failures(token, user, failures + 1);
            rv = CKR_PIN_INCORRECT;
        } else if (rv == CKR_OK) {
            long len = read_token_pin(token, token_pin, sizeof token_pin);
            rv = len < 0 ? CKR_GENERAL_ERROR
                         : real->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)token_pin,
                                         (CK_ULONG)len);
            explicit_bzero(token_pin, sizeof token_pin);
            if (rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LEN_RANGE) {
                fprintf(stderr,
                        "cloudhsm-shim: SoftHSM2 refuses the PIN in token-pin of %s: it was "
                        "re-keyed after this process initialised the module (re-initialise), or "
                        "the file is wrong\n",
                        token);
                rv = CKR_GENERAL_ERROR;
            }
        }
        explicit_bzero(digest, sizeof digest);
    } else {
        rv = real->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)password, strlen(password));
        if (rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LEN_RANGE) {
            write_failures(token, user, failures + 1);
            rv = CKR_PIN_INCORRECT;
        }
    }
    if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN) {
        write_failures(token, user, 0);
        if (rv == CKR_OK) {
            pthread_mutex_lock(&state_lock);
            login.logged_in = 1;
            snprintf(login.user, sizeof login.user, "%s", user);
            snprintf(login.token, sizeof login.token, "%s", token);
            login_marker(token, user, 1);
            pthread_mutex_unlock(&state_lock);
        }
    }
    unlock_cluster(fd);
    explicit_bzero(given, sizeof given);
    return rv;
}

static CK_RV shim_Logout(CK_SESSION_HANDLE session) {
    CK_RV rv = real->C_Logout(session);
    if (rv == CKR_OK)
        logged_out();
    return rv;
}

/* Attributes CloudHSM accepts in a key template, and the further ones it reports. */
static const CK_ATTRIBUTE_TYPE TEMPLATE_OK[] = {
    CKA_CLASS,   CKA_KEY_TYPE, CKA_VALUE_LEN, CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE,
    CKA_EXTRACTABLE, CKA_LABEL, CKA_ID,       CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP,
    CKA_UNWRAP,  CKA_SIGN,     CKA_VERIFY,    CKA_DERIVE};
static const CK_ATTRIBUTE_TYPE READ_ONLY_OK[] = {
    CKA_LOCAL, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE, CKA_KEY_GEN_MECHANISM,
    CKA_CHECK_VALUE, CKA_MODIFIABLE, CKA_DESTROYABLE, CKA_TRUSTED, CKA_WRAP_WITH_TRUSTED,
    CKA_VALUE};

static int in_list(CK_ATTRIBUTE_TYPE t, const CK_ATTRIBUTE_TYPE *list, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (list[i] == t)
            return 1;
    return 0;
}

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static int template_ok(CK_ATTRIBUTE_PTR t, CK_ULONG n) {
    for (CK_ULONG i = 0; i < n; i++)
        if (!in_list(t[i].type, TEMPLATE_OK, COUNT(TEMPLATE_OK)))
            return 0;
    return 1;
}

static int wants_token_object(CK_ATTRIBUTE_PTR t, CK_ULONG n) {
    for (CK_ULONG i = 0; i < n; i++)
        if (t[i].type == CKA_TOKEN && t[i].pValue != NULL && t[i].ulValueLen == sizeof(CK_BBOOL))
            return *(CK_BBOOL *)t[i].pValue == CK_TRUE;
    return 0;
}

static CK_RV shim_GenerateKey(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mech,
                              CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR key) {
    GUARD(1);
    if (!template_ok(t, n))
        return CKR_TEMPLATE_INCONSISTENT;
    pthread_mutex_lock(&state_lock);
    int unavailable = faults.key_availability_fails;
    pthread_mutex_unlock(&state_lock);
    if (unavailable && wants_token_object(t, n))
        return CKR_FUNCTION_FAILED;
    return real->C_GenerateKey(session, mech, t, n, key);
}

static CK_RV shim_CreateObject(CK_SESSION_HANDLE session, CK_ATTRIBUTE_PTR t, CK_ULONG n,
                               CK_OBJECT_HANDLE_PTR obj) {
    GUARD(1);
    if (!template_ok(t, n))
        return CKR_TEMPLATE_INCONSISTENT;
    return real->C_CreateObject(session, t, n, obj);
}

static CK_RV shim_GetAttributeValue(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE obj,
                                    CK_ATTRIBUTE_PTR t, CK_ULONG n) {
    GUARD(0);
    CK_ATTRIBUTE_PTR ok = calloc(n ? n : 1, sizeof *ok);
    CK_ULONG *where = calloc(n ? n : 1, sizeof *where);
    if (ok == NULL || where == NULL) {
        free(ok);
        free(where);
        return CKR_HOST_MEMORY;
    }
    CK_ULONG m = 0;
    int refused = 0;
    for (CK_ULONG i = 0; i < n; i++) {
        if (in_list(t[i].type, TEMPLATE_OK, COUNT(TEMPLATE_OK)) ||
            in_list(t[i].type, READ_ONLY_OK, COUNT(READ_ONLY_OK))) {
            ok[m] = t[i];
            where[m++] = i;
        } else {
            t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
            refused = 1;
        }
    }
    CK_RV rv = m ? real->C_GetAttributeValue(session, obj, ok, m) : CKR_OK;
    for (CK_ULONG j = 0; j < m; j++)
        t[where[j]].ulValueLen = ok[j].ulValueLen;
    free(ok);
    free(where);
    if (refused && (rv == CKR_OK || rv == CKR_ATTRIBUTE_TYPE_INVALID))
        return CKR_ATTRIBUTE_TYPE_INVALID;
    return rv;
}

/* SoftHSM2's token directory, from its configuration file. */
static int softhsm_tokendir(char *out, size_t size) {
    const char *path = getenv("SOFTHSM2_CONF");
    FILE *fh = fopen(path != NULL && path[0] ? path : "/etc/softhsm/softhsm2.conf", "r");
    if (fh == NULL)
        return -1;
    char line[PATH_MAX + 64];
    int found = -1;
    while (found != 0 && fgets(line, sizeof line, fh) != NULL) {
        char *eq = strchr(line, '=');
        if (eq == NULL)
            continue;
        *eq = '\0';
        trim(line);
        if (strcmp(line, "directories.tokendir") != 0)
            continue;
        char *value = eq + 1;
        trim(value);
        snprintf(out, size, "%s", value);
        found = 0;
    }
    fclose(fh);
    return found;
}

/*
 * CloudHSM's library asks the cluster, so a key another process made is found at once. SoftHSM2
 * re-reads a token only when the token's generation counter moved since this process last
 * looked, and a process's own writes mark the counter seen, swallowing other processes' changes.
 * Moving the counter before each search makes this process (and the others) re-read the token,
 * as CloudHSM would answer. SoftHSM2 keeps the counter as 8 big-endian bytes in
 * TOKENDIR/<uuid>/generation, under an fcntl lock; the token serial is the uuid's last 16 hex
 * digits.
 */
static void move_generation(CK_SESSION_HANDLE session) {
    CK_SESSION_INFO info;
    CK_TOKEN_INFO token;
    char tokendir[PATH_MAX / 2], serial[17];
    if (real->C_GetSessionInfo(session, &info) != CKR_OK ||
        real->C_GetTokenInfo(info.slotID, &token) != CKR_OK ||
        softhsm_tokendir(tokendir, sizeof tokendir) != 0)
        return;
    memcpy(serial, token.serialNumber, 16);
    serial[16] = '\0';
    trim(serial);
    if (strlen(serial) != 16)
        return;
    char suffix[20];
    snprintf(suffix, sizeof suffix, "%.4s-%.12s", serial, serial + 4);
    DIR *dir = opendir(tokendir);
    if (dir == NULL)
        return;
    struct dirent *entry;
    char path[PATH_MAX];
    path[0] = '\0';
    while ((entry = readdir(dir)) != NULL) {
        size_t len = strlen(entry->d_name);
        if (len >= 17 && strcmp(entry->d_name + len - 17, suffix) == 0) {
            snprintf(path, sizeof path, "%s/%s/generation", tokendir, entry->d_name);
            break;
        }
    }
    closedir(dir);
    int fd = path[0] ? open(path, O_RDWR | O_CLOEXEC) : -1;
    if (fd < 0)
        return;
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (fcntl(fd, F_SETLKW, &fl) == 0) {
        unsigned char bytes[8];
        if (pread(fd, bytes, 8, 0) == 8) {
            uint64_t value = 0;
            for (int i = 0; i < 8; i++)
                value = (value << 8) | bytes[i];
            value++;
            for (int i = 7; i >= 0; i--, value >>= 8)
                bytes[i] = (unsigned char)(value & 0xff);
            if (pwrite(fd, bytes, 8, 0) != 8)
                fprintf(stderr, "cloudhsm-shim: cannot write %s\n", path);
        }
        fl.l_type = F_UNLCK;
        fcntl(fd, F_SETLK, &fl);
    }
    close(fd);
}

/*
 * CloudHSM makes a key in one step: no search ever shows half of one. SoftHSM2 writes a new
 * object's file with default attributes first and the template and value afterwards, so a
 * process killed in between leaves a secret key with no label, no CKA_ID and no value on disk.
 * Searches skip exactly that shape (nothing a caller could have made: every key has a value).
 */
static int half_made(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE obj) {
    CK_OBJECT_CLASS cls = 0;
    CK_ATTRIBUTE probe[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_LABEL, NULL, 0},
        {CKA_ID, NULL, 0},
        {CKA_VALUE_LEN, NULL, 0},
    };
    if (real->C_GetAttributeValue(session, obj, probe, 4) != CKR_OK || cls != CKO_SECRET_KEY)
        return 0;
    CK_ULONG value_len = 1;
    CK_ATTRIBUTE length = {CKA_VALUE_LEN, &value_len, sizeof value_len};
    if (real->C_GetAttributeValue(session, obj, &length, 1) != CKR_OK)
        return 0;
    return probe[1].ulValueLen == 0 && probe[2].ulValueLen == 0 && value_len == 0;
}

static CK_RV shim_FindObjects(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE_PTR out, CK_ULONG max,
                              CK_ULONG_PTR count) {
    GUARD(0);
    if (out == NULL || count == NULL)
        return real->C_FindObjects(session, out, max, count);
    for (;;) {
        CK_ULONG got = 0;
        CK_RV rv = real->C_FindObjects(session, out, max, &got);
        if (rv != CKR_OK)
            return rv;
        CK_ULONG kept = 0;
        for (CK_ULONG i = 0; i < got; i++)
            if (!half_made(session, out[i]))
                out[kept++] = out[i];
        /* A batch of nothing but half-made objects must not read as the end of the search. */
        if (kept > 0 || got == 0) {
            *count = kept;
            return CKR_OK;
        }
    }
}

static CK_RV shim_FindObjectsInit(CK_SESSION_HANDLE session, CK_ATTRIBUTE_PTR t, CK_ULONG n) {
    GUARD(1);
    move_generation(session);
    return real->C_FindObjectsInit(session, t, n);
}

static CK_RV shim_EncryptInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mech,
                              CK_OBJECT_HANDLE key) {
    GUARD(1);
    if (mech == NULL || mech->mechanism != CKM_AES_GCM) {
        CK_RV rv = real->C_EncryptInit(session, mech, key);
        if (rv == CKR_OK)
            session_flags(session, 0, 0);
        return rv;
    }
    if (mech->pParameter == NULL || mech->ulParameterLen != sizeof(CK_GCM_PARAMS))
        return CKR_MECHANISM_PARAM_INVALID;
    CK_GCM_PARAMS *given = mech->pParameter;
    if (given->pIv == NULL || given->ulIvLen != GCM_IV_BYTES)
        return CKR_MECHANISM_PARAM_INVALID;
    for (int i = 0; i < GCM_IV_BYTES; i++)
        if (given->pIv[i] != 0)
            return CKR_MECHANISM_PARAM_INVALID; /* the IV buffer must be zero-filled */
    unsigned char iv[GCM_IV_BYTES];
    if (getrandom(iv, sizeof iv, 0) != (ssize_t)sizeof iv)
        return CKR_FUNCTION_FAILED;
    CK_GCM_PARAMS params = *given;
    params.pIv = iv;
    params.ulIvBits = GCM_IV_BYTES * 8;
    CK_MECHANISM inner = {CKM_AES_GCM, &params, sizeof params};
    CK_RV rv = real->C_EncryptInit(session, &inner, key);
    if (rv == CKR_OK) {
        memcpy(given->pIv, iv, GCM_IV_BYTES); /* the HSM's IV, in the caller's buffer */
        session_flags(session, 0, 1);
    }
    return rv;
}

/* Ends the active operation (PKCS#11: an error other than BUFFER_TOO_SMALL ends it). */
static void abandon(CK_SESSION_HANDLE session, int encrypt, CK_BYTE_PTR in, CK_ULONG len) {
    CK_ULONG out_len = len + 64;
    CK_BYTE_PTR out = malloc(out_len);
    if (out == NULL)
        return;
    if (encrypt)
        real->C_Encrypt(session, in, len, out, &out_len);
    else
        real->C_Decrypt(session, in, len, out, &out_len);
    free(out);
}

static CK_RV shim_Encrypt(CK_SESSION_HANDLE session, CK_BYTE_PTR in, CK_ULONG len,
                          CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
    GUARD(0);
    if (session_is_gcm(session, 0) && len > GCM_SINGLE_PART_MAX) {
        abandon(session, 1, in, len);
        return CKR_DATA_LEN_RANGE;
    }
    return real->C_Encrypt(session, in, len, out, out_len);
}

static CK_RV shim_DecryptInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mech,
                              CK_OBJECT_HANDLE key) {
    GUARD(1);
    CK_RV rv = real->C_DecryptInit(session, mech, key);
    if (rv == CKR_OK)
        session_flags(session, 1, mech != NULL && mech->mechanism == CKM_AES_GCM);
    return rv;
}

static CK_RV shim_Decrypt(CK_SESSION_HANDLE session, CK_BYTE_PTR in, CK_ULONG len,
                          CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
    GUARD(0);
    int gcm = session_is_gcm(session, 1);
    if (gcm && len > GCM_SINGLE_PART_MAX) {
        abandon(session, 0, in, len);
        return CKR_DATA_LEN_RANGE;
    }
    CK_RV rv = real->C_Decrypt(session, in, len, out, out_len);
    if (gcm && rv == CKR_GENERAL_ERROR)
        rv = CKR_ENCRYPTED_DATA_INVALID; /* the tag did not verify */
    return rv;
}

static CK_RV shim_GenerateRandom(CK_SESSION_HANDLE session, CK_BYTE_PTR out, CK_ULONG len) {
    GUARD(1);
    return real->C_GenerateRandom(session, out, len);
}

static CK_RV shim_DestroyObject(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE obj) {
    GUARD(0);
    return real->C_DestroyObject(session, obj);
}

static CK_RV not_supported(void) { return CKR_FUNCTION_NOT_SUPPORTED; }

static CK_RV shim_InitToken(CK_SLOT_ID a, CK_UTF8CHAR_PTR b, CK_ULONG c, CK_UTF8CHAR_PTR d) {
    (void)a, (void)b, (void)c, (void)d;
    return not_supported();
}
static CK_RV shim_InitPIN(CK_SESSION_HANDLE a, CK_UTF8CHAR_PTR b, CK_ULONG c) {
    (void)a, (void)b, (void)c;
    return not_supported();
}
static CK_RV shim_SetPIN(CK_SESSION_HANDLE a, CK_UTF8CHAR_PTR b, CK_ULONG c, CK_UTF8CHAR_PTR d,
                         CK_ULONG e) {
    (void)a, (void)b, (void)c, (void)d, (void)e;
    return not_supported();
}
static CK_RV shim_SeedRandom(CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c) {
    (void)a, (void)b, (void)c;
    return not_supported();
}
static CK_RV shim_SetAttributeValue(CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR c,
                                    CK_ULONG d) {
    (void)a, (void)b, (void)c, (void)d;
    return not_supported();
}
static CK_RV shim_CopyObject(CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR c,
                             CK_ULONG d, CK_OBJECT_HANDLE_PTR e) {
    (void)a, (void)b, (void)c, (void)d, (void)e;
    return not_supported();
}
static CK_RV shim_GetObjectSize(CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ULONG_PTR c) {
    (void)a, (void)b, (void)c;
    return not_supported();
}

/* ---- loading ------------------------------------------------------------------------------ */

/* dlopen a copy of `path` under a unique name (the loader shares a library that has the same name
 * or file as one already loaded); the copy is unlinked at once, its mapping stays. */
static void *open_private_copy(const char *path) {
    const char *tmp = getenv("TMPDIR");
    char name[PATH_MAX];
    snprintf(name, sizeof name, "%s/cloudhsm-shim-target-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    int in = open(path, O_RDONLY | O_CLOEXEC);
    int copy = in >= 0 ? mkostemp(name, O_CLOEXEC) : -1;
    if (copy < 0) {
        if (in >= 0)
            close(in);
        return dlopen(path, RTLD_NOW | RTLD_LOCAL);
    }
    char buf[1 << 16];
    ssize_t n;
    while ((n = read(in, buf, sizeof buf)) > 0)
        if (write(copy, buf, (size_t)n) != n) {
            n = -1;
            break;
        }
    close(in);
    close(copy);
    void *handle = n == 0 ? dlopen(name, RTLD_NOW | RTLD_LOCAL) : NULL;
    unlink(name);
    return handle != NULL ? handle : dlopen(path, RTLD_NOW | RTLD_LOCAL);
}

static CK_RV load_real(void) {
    if (real != NULL)
        return CKR_OK;
    load_conf();
    /* A private copy: a process that also loads SoftHSM2 directly (the tests do) must get two
     * independent instances, and the dynamic loader shares a library by file identity.
     * (dlmopen into a new namespace would be the tidy way, but OpenSSL crashes there.) */
    real_handle = open_private_copy(conf.target);
    if (real_handle == NULL) {
        fprintf(stderr, "cloudhsm-shim: cannot load %s: %s\n", conf.target, dlerror());
        return CKR_GENERAL_ERROR;
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(real_handle, "C_GetFunctionList");
    if (get == NULL || get(&real) != CKR_OK || real == NULL) {
        fprintf(stderr, "cloudhsm-shim: %s has no usable C_GetFunctionList\n", conf.target);
        real = NULL;
        return CKR_GENERAL_ERROR;
    }
    shim = *real;
    shim.C_Initialize = shim_Initialize;
    shim.C_Finalize = shim_Finalize;
    shim.C_GetInfo = shim_GetInfo;
    shim.C_GetSlotList = shim_GetSlotList;
    shim.C_GetTokenInfo = shim_GetTokenInfo;
    shim.C_OpenSession = shim_OpenSession;
    shim.C_CloseSession = shim_CloseSession;
    shim.C_CloseAllSessions = shim_CloseAllSessions;
    shim.C_Login = shim_Login;
    shim.C_Logout = shim_Logout;
    shim.C_GenerateKey = shim_GenerateKey;
    shim.C_CreateObject = shim_CreateObject;
    shim.C_GetAttributeValue = shim_GetAttributeValue;
    shim.C_FindObjectsInit = shim_FindObjectsInit;
    shim.C_FindObjects = shim_FindObjects;
    shim.C_EncryptInit = shim_EncryptInit;
    shim.C_Encrypt = shim_Encrypt;
    shim.C_DecryptInit = shim_DecryptInit;
    shim.C_Decrypt = shim_Decrypt;
    shim.C_GenerateRandom = shim_GenerateRandom;
    shim.C_DestroyObject = shim_DestroyObject;
    shim.C_InitToken = shim_InitToken;
    shim.C_InitPIN = shim_InitPIN;
    shim.C_SetPIN = shim_SetPIN;
    shim.C_SeedRandom = shim_SeedRandom;
    shim.C_SetAttributeValue = shim_SetAttributeValue;
    shim.C_CopyObject = shim_CopyObject;
    shim.C_GetObjectSize = shim_GetObjectSize;
    shim.C_GetFunctionList = C_GetFunctionList;
    return CKR_OK;
}

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
    static pthread_mutex_t once = PTHREAD_MUTEX_INITIALIZER;
    if (list == NULL)
        return CKR_ARGUMENTS_BAD;
    pthread_mutex_lock(&once);
    CK_RV rv = load_real();
    pthread_mutex_unlock(&once);
    if (rv == CKR_OK)
        *list = &shim;
    return rv;
}
