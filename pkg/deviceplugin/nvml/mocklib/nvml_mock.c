/*
 * A stand-in for libnvidia-ml.so.1 that pynvml loads like the real one, serving the
 * GPUs of a flat text file that mocklib/__init__.py writes from a mock topology file.
 * It implements exactly the entry points RealBackend reaches through pynvml, so the
 * ctypes structures and calling conventions are exercised without a GPU.
 *
 * The file is named by $KYB_NVML_MOCK_TOPOLOGY and read at nvmlInit; times in it are
 * milliseconds after that nvmlInit. One line per fact:
 *   gpu <minor> <numa|-1> <memoryMiB> <busId> <uuid> <lostAtMs|-1> <backAtMs|-1> <name...>
 *   level <a> <b> <nvmlGpuTopologyLevel_t|unknown>
 *   port <gpu> <remoteType> <remoteBusId|unknown>  (one active NVLink)
 * "unknown" makes that query return NVML_ERROR_UNKNOWN, which nvml.h documents for both
 * ("an error has occurred in underlying topology discovery").
 *   xid <gpu> <atMs> <xid> <recoveryAction|-1>     (-1: the driver has no such field)
 *   mig <gpu> <current> <pending>                  (MIG mode; without it Not Supported)
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_UNKNOWN = 999,
};

#define MAX_GPUS 64
#define MAX_PORTS 64
#define MAX_XIDS 256
#define TEXT 96
#define XID_CRITICAL_ERROR 0x8ULL
#define LEVEL_UNKNOWN 0xFFFFFFFFu

typedef struct {
    unsigned minor;
    int numa;
    unsigned long long memory_mib;
    char bus_id[32];
    char uuid[TEXT];
    char name[TEXT];
    long long lost_at, back_at;
    int mig_current, mig_pending; /* -1: the GPU has no MIG (Not Supported) */
    int nports;
    unsigned port_type[MAX_PORTS];
    char port_bus[MAX_PORTS][32];
} gpu_t;

typedef struct { int gpu; long long at; unsigned long long xid; int delivered; int action; } xid_t;

/* The layouts pynvml declares with ctypes (nvml.h). */
typedef struct {
    char busIdLegacy[16];
    unsigned domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef gpu_t *nvmlDevice_t;
typedef struct { unsigned long long registered[MAX_GPUS]; } event_set_t;
typedef event_set_t *nvmlEventSet_t;
typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int refcount;
static struct timespec started;
static gpu_t gpus[MAX_GPUS];
static int ngpus;
static unsigned levels[MAX_GPUS][MAX_GPUS];
static xid_t xids[MAX_XIDS];
static int nxids;

static long long elapsed_ms(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - started.tv_sec) * 1000LL + (now.tv_nsec - started.tv_nsec) / 1000000;
}

static int is_lost(const gpu_t *g) {
    long long t = elapsed_ms();
    return g->lost_at >= 0 && t >= g->lost_at && (g->back_at < 0 || t < g->back_at);
}

static int load(const char *path) {
    FILE *f = fopen(path, "r");
    char line[512];
    if (!f) return 0;
    ngpus = nxids = 0;
    memset(gpus, 0, sizeof gpus);
    memset(xids, 0, sizeof xids);
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        int a, b, n = 0;
        unsigned u;
        long long at;
        unsigned long long x;
        char bus[32];
        if (strncmp(line, "gpu ", 4) == 0 && ngpus < MAX_GPUS) {
            gpu_t *g = &gpus[ngpus];
            if (sscanf(line, "gpu %u %d %llu %31s %95s %lld %lld %n", &g->minor, &g->numa,
                       &g->memory_mib, g->bus_id, g->uuid, &g->lost_at, &g->back_at, &n) >= 7) {
                snprintf(g->name, TEXT, "%s", line + n);
                g->mig_current = g->mig_pending = -1;
                ngpus++;
            }
        } else if (sscanf(line, "level %d %d %n", &a, &b, &n) == 2 && a >= 0 && b >= 0 &&
                   a < MAX_GPUS && b < MAX_GPUS) {
            if (strcmp(line + n, "unknown") == 0) u = LEVEL_UNKNOWN;
            else if (sscanf(line + n, "%u", &u) != 1) continue;
            levels[a][b] = levels[b][a] = u;
        } else if (sscanf(line, "port %d %u %31s", &a, &u, bus) == 3 && a < ngpus &&
                   gpus[a].nports < MAX_PORTS) {
            gpu_t *g = &gpus[a];
            g->port_type[g->nports] = u;
            snprintf(g->port_bus[g->nports++], 32, "%s", bus);
        } else if (sscanf(line, "mig %d %d %d", &a, &b, &n) == 3 && a >= 0 && a < ngpus) {
            gpus[a].mig_current = b;
            gpus[a].mig_pending = n;
        } else if (sscanf(line, "xid %d %lld %llu %d", &a, &at, &x, &b) == 4 && nxids < MAX_XIDS) {
            xids[nxids++] = (xid_t){a, at, x, 0, b};
        }
    }
    fclose(f);
    return 1;
}

/* Every device call starts here: initialized, a device of ours, and on the bus. */
#define CHECK_DEVICE(dev)                                                              \
    do {                                                                               \
        if (!refcount) return NVML_ERROR_UNINITIALIZED;                                \
        if ((dev) < gpus || (dev) >= gpus + ngpus) return NVML_ERROR_INVALID_ARGUMENT; \
        if (is_lost(dev)) return NVML_ERROR_GPU_IS_LOST;                               \
    } while (0)

static nvmlReturn_t copy_text(char *dst, unsigned size, const char *src) {
    if (strlen(src) + 1 > size) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned flags) {
    (void)flags;
    nvmlReturn_t ret = NVML_SUCCESS;
    pthread_mutex_lock(&lock);
    if (refcount == 0) {
        const char *path = getenv("KYB_NVML_MOCK_TOPOLOGY");
        if (!path || !load(path)) ret = NVML_ERROR_UNKNOWN;
        else clock_gettime(CLOCK_MONOTONIC, &started);
    }
    if (ret == NVML_SUCCESS) refcount++;
    pthread_mutex_unlock(&lock);
    return ret;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    nvmlReturn_t ret = refcount ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
    if (refcount) refcount--;
    pthread_mutex_unlock(&lock);
    return ret;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned length) {
    return copy_text(version, length, "550.127.08-kyb-mock");
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count) {
    if (!refcount) return NVML_ERROR_UNINITIALIZED;
    *count = (unsigned)ngpus;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, nvmlDevice_t *device) {
    if (!refcount) return NVML_ERROR_UNINITIALIZED;
    if (index >= (unsigned)ngpus) return NVML_ERROR_INVALID_ARGUMENT;
    CHECK_DEVICE(&gpus[index]);
    *device = &gpus[index];
    return NVML_SUCCESS;
}

/* nvml.h: NVML_ERROR_GPU_IS_LOST "if any GPU has fallen off the bus or is otherwise
 * inaccessible": one lost GPU fails every lookup by UUID. */
nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    if (!refcount) return NVML_ERROR_UNINITIALIZED;
    for (int i = 0; i < ngpus; i++)
        if (is_lost(&gpus[i])) return NVML_ERROR_GPU_IS_LOST;
    for (int i = 0; i < ngpus; i++) {
        if (strcmp(gpus[i].uuid, uuid) == 0) {
            CHECK_DEVICE(&gpus[i]);
            *device = &gpus[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned length) {
    CHECK_DEVICE(d);
    return copy_text(uuid, length, d->uuid);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned length) {
    CHECK_DEVICE(d);
    return copy_text(name, length, d->name);
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned *current, unsigned *pending) {
    CHECK_DEVICE(d);
    if (d->mig_current < 0) return NVML_ERROR_NOT_SUPPORTED;
    *current = (unsigned)d->mig_current;
    *pending = (unsigned)d->mig_pending;
    return NVML_SUCCESS;
}

/* On a MIG-enabled GPU, memory info needs the MIG monitor capability, which a container
 * has only with NVIDIA_MIG_MONITOR_DEVICES=all (NVIDIA's device plugin, issue 399). */
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *memory) {
    CHECK_DEVICE(d);
    if (d->mig_current == 1 && !getenv("KYB_NVML_MOCK_MIG_MONITOR")) return NVML_ERROR_NO_PERMISSION;
    memory->total = d->memory_mib << 20;
    memory->used = 0;
    memory->free = memory->total;
    return NVML_SUCCESS;
}

static void fill_pci(nvmlPciInfo_t *pci, const char *bus_id) {
    memset(pci, 0, sizeof *pci);
    snprintf(pci->busId, sizeof pci->busId, "%s", bus_id);
    sscanf(bus_id, "%x:%x:%x", &pci->domain, &pci->bus, &pci->device);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.0", pci->domain & 0xFFFF,
             pci->bus, pci->device);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *pci) {
    CHECK_DEVICE(d);
    fill_pci(pci, d->bus_id);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t d, unsigned *minor) {
    CHECK_DEVICE(d);
    *minor = d->minor;
    return NVML_SUCCESS;
}

/* nvml.h: the GPU's own NUMA node, only on platforms where GPUs are NUMA nodes (Grace);
 * the mock topologies are not such platforms. The CPU-side node is the nearest memory. */
nvmlReturn_t nvmlDeviceGetNumaNodeId(nvmlDevice_t d, unsigned *node) {
    CHECK_DEVICE(d);
    (void)node;
    return NVML_ERROR_NOT_SUPPORTED;
}

nvmlReturn_t nvmlDeviceGetMemoryAffinity(nvmlDevice_t d, unsigned size, unsigned long *set,
                                         unsigned scope) {
    CHECK_DEVICE(d);
    (void)scope;
    if (!set || !size) return NVML_ERROR_INVALID_ARGUMENT;
    memset(set, 0, size * sizeof *set);
    const int bits = (int)(8 * sizeof *set);
    if (d->numa >= 0 && d->numa / bits < (int)size) set[d->numa / bits] = 1UL << (d->numa % bits);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTopologyCommonAncestor(nvmlDevice_t a, nvmlDevice_t b, unsigned *level) {
    CHECK_DEVICE(a);
    CHECK_DEVICE(b);
    if (levels[a - gpus][b - gpus] == LEVEL_UNKNOWN) return NVML_ERROR_UNKNOWN;
    *level = levels[a - gpus][b - gpus];
    return NVML_SUCCESS;
}

static nvmlReturn_t check_link(nvmlDevice_t d, unsigned link) {
    CHECK_DEVICE(d);
    if (d->nports == 0) return NVML_ERROR_NOT_SUPPORTED;
    if (link >= (unsigned)d->nports) return NVML_ERROR_INVALID_ARGUMENT;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t d, unsigned link, unsigned *active) {
    nvmlReturn_t ret = check_link(d, link);
    if (ret == NVML_SUCCESS) *active = 1;
    return ret;
}

nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo_v2(nvmlDevice_t d, unsigned link, nvmlPciInfo_t *pci) {
    nvmlReturn_t ret = check_link(d, link);
    if (ret != NVML_SUCCESS) return ret;
    if (strcmp(d->port_bus[link], "unknown") == 0) return NVML_ERROR_UNKNOWN;
    fill_pci(pci, d->port_bus[link]);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNvLinkRemoteDeviceType(nvmlDevice_t d, unsigned link, unsigned *type) {
    nvmlReturn_t ret = check_link(d, link);
    if (ret == NVML_SUCCESS) *type = d->port_type[link];
    return ret;
}

/* The layouts of nvmlValue_t and nvmlFieldValue_t (nvml.h). */
typedef union {
    double dVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    signed long long sllVal;
    int siVal;
    unsigned short usVal;
} nvmlValue_t;
typedef struct {
    unsigned fieldId, scopeId;
    long long timestamp, latencyUsec;
    unsigned valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;
#define FI_DEV_GET_GPU_RECOVERY_ACTION 230
#define VALUE_TYPE_UNSIGNED_INT 1

/* Only the GPU recovery action is served: what the GPU's last XID so far says (nvml.h
 * reports NOT_SUPPORTED per field where a driver has none: -1 in the data file). */
nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t d, int count, nvmlFieldValue_t *values) {
    CHECK_DEVICE(d);
    if (count < 0 || (count && !values)) return NVML_ERROR_INVALID_ARGUMENT;
    long long now = elapsed_ms();
    for (int i = 0; i < count; i++) {
        nvmlFieldValue_t *v = &values[i];
        v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        if (v->fieldId != FI_DEV_GET_GPU_RECOVERY_ACTION) continue;
        long long last = -1;
        for (int k = 0; k < nxids; k++) {
            const xid_t *x = &xids[k];
            if (&gpus[x->gpu] != d || x->at > now || x->action < 0 || x->at < last) continue;
            last = x->at;
            v->valueType = VALUE_TYPE_UNSIGNED_INT;
            v->value.uiVal = (unsigned)x->action;
            v->nvmlReturn = NVML_SUCCESS;
        }
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    if (!refcount) return NVML_ERROR_UNINITIALIZED;
    *set = calloc(1, sizeof(event_set_t));
    return *set ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long types, nvmlEventSet_t set) {
    CHECK_DEVICE(d);
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    if (types & ~XID_CRITICAL_ERROR) return NVML_ERROR_NOT_SUPPORTED;
    set->registered[d - gpus] |= types;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned timeout_ms) {
    if (!refcount) return NVML_ERROR_UNINITIALIZED;
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    long long deadline = elapsed_ms() + timeout_ms;
    for (;;) {
        long long now = elapsed_ms(), next = deadline;
        pthread_mutex_lock(&lock);
        for (int i = 0; i < nxids; i++) {
            xid_t *x = &xids[i];
            if (x->delivered || !(set->registered[x->gpu] & XID_CRITICAL_ERROR)) continue;
            if (x->at <= now) {
                x->delivered = 1;
                memset(data, 0, sizeof *data);
                data->device = &gpus[x->gpu];
                data->eventType = XID_CRITICAL_ERROR;
                data->eventData = x->xid;
                pthread_mutex_unlock(&lock);
                return NVML_SUCCESS;
            }
            if (x->at < next) next = x->at;
        }
        /* nvml.h: GPU_IS_LOST "if a GPU has fallen off the bus": after its last events */
        for (int i = 0; i < ngpus; i++) {
            if (!(set->registered[i] & XID_CRITICAL_ERROR)) continue;
            if (is_lost(&gpus[i])) {
                pthread_mutex_unlock(&lock);
                return NVML_ERROR_GPU_IS_LOST;
            }
            if (gpus[i].lost_at > now && gpus[i].lost_at < next) next = gpus[i].lost_at;
        }
        pthread_mutex_unlock(&lock);
        if (now >= deadline) return NVML_ERROR_TIMEOUT;
        long long wait = next - now;
        struct timespec ts = {wait / 1000, (wait % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    free(set);
    return NVML_SUCCESS;
}
