/* Decode attention over a paged KV cache, for the CPU.
 *
 * One query token per sequence attends to that sequence's keys, read in place from the cache
 * blocks its block table names. Nothing is gathered or padded, and the whole batch is one call.
 * Built and loaded by paged_attention.py, which says why this exists.
 *
 * Layouts (contiguous):
 *   q, out      float32, each sequence's heads somewhere (strides below), each head's dim contiguous
 *   k, v        [kv_heads, slots, dim]         one layer of the cache, float32, bfloat16 or float16;
 *                                              block b holds slots b*block_size .. (b+1)*block_size-1
 *   table       [batch, table_width] int64     each sequence's blocks, in order
 *   lengths     [batch] int64                  each sequence's key count (its blocks are full but the last)
 * Query heads h*group .. h*group+group-1 share KV head h (grouped-query attention). Sums are in float32.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { CACHE_FLOAT32 = 0, CACHE_BFLOAT16 = 1, CACHE_FLOAT16 = 2 };

static inline float from_float32(const float *p, int64_t i) { return p[i]; }
static inline float from_bfloat16(const uint16_t *p, int64_t i) { /* bfloat16 is float32's top half */
    const uint32_t bits = (uint32_t)p[i] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}
/* A narrow float's bits to float32, given its exponent and mantissa widths: a normal value's bits
 * move into float32's places with its exponent rebiased; a subnormal one (exponent 0) is its
 * mantissa times its least step. Integer and float operations that vectorise, with no float32
 * subnormals on the way (each costs a CPU a slow assist); a compiler's own half-precision type may
 * convert one value at a time. Infinities and NaNs, which a cache should not hold, come out as
 * large finite values. */
static inline float widen(uint32_t bits, int exponent_bits, int mantissa_bits) {
    const int total = exponent_bits + mantissa_bits, bias = (1 << (exponent_bits - 1)) - 1;
    const uint32_t magnitude = bits & ((1u << total) - 1), sign = (bits >> total) << 31;
    const uint32_t normal_bits = (magnitude << (23 - mantissa_bits)) + ((uint32_t)(127 - bias) << 23);
    float normal, value;
    memcpy(&normal, &normal_bits, sizeof normal);
    const float subnormal = (float)magnitude * ldexpf(1.0f, 1 - bias - mantissa_bits);
    value = magnitude >> mantissa_bits ? normal : subnormal;
    uint32_t out;
    memcpy(&out, &value, sizeof out);
    out |= sign;
    memcpy(&value, &out, sizeof value);
    return value;
}
static inline float from_float16(const uint16_t *p, int64_t i) { return widen(p[i], 5, 10); }

#define PREFETCH_AHEAD 2 /* blocks: enough that memory's latency hides behind the blocks between (4 and 8 were no better) */

/* Ask for a cache block ahead of its use. Each block is a page or less of its own, and a CPU's
 * prefetcher stops at page edges, so without this every block starts with a wait on memory. */
static inline void prefetch_block(const void *start, size_t bytes) {
    for (size_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch((const char *)start + offset, 0, 3);
}

#define TILE 16 /* keys converted, scored and summed together */

/* One sequence, one KV head: its `group` query heads over its `length` keys, the cache's elements
 * of type T read through LOAD (IN_PLACE: T is float, read as it is). One pass over the blocks, a
 * tile of keys at a time, with a running softmax: each tile's keys and values are read once, as
 * soon as they arrive, and a narrow tile is converted once for all the group's query heads.
 * always_inline so that each specialisation below gets `dim` and `group` as constants and keeps its
 * sums in registers. */
#define DEFINE_ATTEND_KV_HEAD(NAME, T, LOAD, IN_PLACE)                                                             \
    static inline __attribute__((always_inline)) void NAME(                                                        \
        const float *q, int64_t q_head, const T *k, const T *v, const int64_t *blocks, int64_t length, float *out, \
        int64_t out_head, const int64_t group, const int64_t dim, int64_t block_size, float scale) {               \
        const size_t block_bytes = (size_t)(block_size * dim) * sizeof(T);                                         \
        float top[group], total[group], sums[group * dim]; /* sums: out, before dividing by total */              \
        float scores[group * TILE], key_tile[IN_PLACE ? 1 : TILE * dim], value_tile[IN_PLACE ? 1 : TILE * dim];    \
        for (int64_t g = 0; g < group; g++) {                                                                      \
            top[g] = -FLT_MAX; /* not -INFINITY: -ffast-math lets the compiler assume no infinities */       \
            total[g] = 0.0f;                                                                                       \
        }                                                                                                          \
        memset(sums, 0, sizeof sums);                                                                              \
        for (int64_t first = 0, i = 0; first < length; first += block_size, i++) {                                 \
            if (first + PREFETCH_AHEAD * block_size < length) {                                                    \
                prefetch_block(k + blocks[i + PREFETCH_AHEAD] * block_size * dim, block_bytes);                    \
                prefetch_block(v + blocks[i + PREFETCH_AHEAD] * block_size * dim, block_bytes);                    \
            }                                                                                                      \
            const int64_t in_block = length - first < block_size ? length - first : block_size;                    \
            for (int64_t at = 0; at < in_block; at += TILE) {                                                      \
                const int64_t n = in_block - at < TILE ? in_block - at : TILE;                                     \
                const T *key = k + (blocks[i] * block_size + at) * dim, *value = v + (blocks[i] * block_size + at) * dim; \
                const float *keys = (const float *)key, *values = (const float *)value;                            \
                if (!IN_PLACE) {                                                                                   \
                    _Pragma("omp simd") for (int64_t j = 0; j < n * dim; j++) key_tile[j] = LOAD(key, j);          \
                    _Pragma("omp simd") for (int64_t j = 0; j < n * dim; j++) value_tile[j] = LOAD(value, j);      \
                    keys = key_tile;                                                                               \
                    values = value_tile;                                                                           \
                }                                                                                                  \
                for (int64_t g = 0; g < group; g++) {                                                              \
                    const float *qg = q + g * q_head;                                                              \
                    float *s = scores + g * TILE;                                                                  \
                    for (int64_t t = 0; t < n; t++) { /* scores [n] */                                             \
                        float dot = 0.0f;                                                                          \
                        _Pragma("omp simd reduction(+ : dot)") for (int64_t d = 0; d < dim; d++) dot +=            \
                            qg[d] * keys[t * dim + d];                                                             \
                        s[t] = dot * scale;                                                                        \
                    }                                                                                              \
                    /* the running softmax: what is summed so far is rescaled when this tile raises the maximum */ \
                    float most = top[g];                                                                           \
                    for (int64_t t = 0; t < n; t++) most = s[t] > most ? s[t] : most;                              \
                    const float rescale = expf(top[g] - most);                                                     \
                    float sum = 0.0f;                                                                              \
                    _Pragma("omp simd reduction(+ : sum)") for (int64_t t = 0; t < n; t++) {                       \
                        s[t] = expf(s[t] - most);                                                                  \
                        sum += s[t];                                                                               \
                    }                                                                                              \
                    total[g] = total[g] * rescale + sum;                                                           \
                    top[g] = most;                                                                                 \
                    float acc[dim]; /* sums[g] * rescale + scores @ values */                                     \
                    _Pragma("omp simd") for (int64_t d = 0; d < dim; d++) acc[d] = sums[g * dim + d] * rescale;    \
                    for (int64_t t = 0; t < n; t++) {                                                              \
                        const float p = s[t];                                                                      \
                        _Pragma("omp simd") for (int64_t d = 0; d < dim; d++) acc[d] += p * values[t * dim + d];   \
                    }                                                                                              \
                    _Pragma("omp simd") for (int64_t d = 0; d < dim; d++) sums[g * dim + d] = acc[d];              \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        for (int64_t g = 0; g < group; g++) {                                                                      \
            float *og = out + g * out_head;                                                                        \
            const float inverse = total[g] > 0.0f ? 1.0f / total[g] : 0.0f; /* no keys (never so from KVCache): 0 */ \
            _Pragma("omp simd") for (int64_t d = 0; d < dim; d++) og[d] = sums[g * dim + d] * inverse;             \
        }                                                                                                          \
    }

DEFINE_ATTEND_KV_HEAD(attend_float32, float, from_float32, 1)
DEFINE_ATTEND_KV_HEAD(attend_bfloat16, uint16_t, from_bfloat16, 0)
DEFINE_ATTEND_KV_HEAD(attend_float16, uint16_t, from_float16, 0)

/* The shapes this kernel serves: head dim 32 or 128 with up to 2 query heads per KV head, 64 with up
 * to 4. Past these, its dot products (one key at a time) cost more than SDPA's matrix products:
 * measured at context 512, batch 8, on a 2-core AVX-512 Xeon, SDPA was 5-25% faster at head dim 64
 * with 6 or 8 query heads per KV head, at 128 with 3 or more, and at 32 with 4. The caller takes its
 * SDPA path for those. */
#define FOR_EACH_SHAPE(X, TYPE) \
    X(TYPE, 32, 1) X(TYPE, 32, 2) X(TYPE, 64, 1) X(TYPE, 64, 2) X(TYPE, 64, 3) X(TYPE, 64, 4) X(TYPE, 128, 1) X(TYPE, 128, 2)

#define SPECIALISE(TYPE, DIM, GROUP)                                                                         \
    static void attend_##TYPE##_##DIM##_##GROUP(const float *q, int64_t q_head, const void *k, const void *v,  \
                                                const int64_t *blocks, int64_t length, float *out,             \
                                                int64_t out_head, int64_t block_size, float scale) {           \
        attend_##TYPE(q, q_head, k, v, blocks, length, out, out_head, GROUP, DIM, block_size, scale);          \
    }
FOR_EACH_SHAPE(SPECIALISE, float32)
FOR_EACH_SHAPE(SPECIALISE, bfloat16)
FOR_EACH_SHAPE(SPECIALISE, float16)

typedef void (*attend_fn)(const float *, int64_t, const void *, const void *, const int64_t *, int64_t, float *,
                          int64_t, int64_t, float);

static attend_fn find_attend(int64_t cache_dtype, int64_t dim, int64_t group) {
#define MATCH(TYPE, DIM, GROUP) \
    if (dim == DIM && group == GROUP) return attend_##TYPE##_##DIM##_##GROUP;
    if (cache_dtype == CACHE_FLOAT32) { FOR_EACH_SHAPE(MATCH, float32) }
    if (cache_dtype == CACHE_BFLOAT16) { FOR_EACH_SHAPE(MATCH, bfloat16) }
    if (cache_dtype == CACHE_FLOAT16) { FOR_EACH_SHAPE(MATCH, float16) }
    return NULL;
}

/* Whether this build serves a cache of this dtype with this head dim and query heads per KV head. */
int paged_decode_attention_serves(int64_t cache_dtype, int64_t dim, int64_t group) {
    return find_attend(cache_dtype, dim, group) != NULL;
}

/* Every decode of the step. Queries and outputs are read and written in place: sequence i's head h
 * is at q + rows[i] * q_row + h * q_head (likewise out), its dim contiguous. With `threads` > 1 the
 * sequence-heads are shared out in an OpenMP loop; built with -fopenmp, this library then uses the
 * libgomp torch has loaded (the same soname), so its threads are torch's own, not a second pool.
 * Returns 0, or 1 for a shape or dtype it does not serve. */
int paged_decode_attention(const float *q, int64_t q_row, int64_t q_head, float *out, int64_t out_row,
                           int64_t out_head, const int64_t *rows, const void *k, const void *v,
                           const int64_t *table, const int64_t *lengths, int64_t batch, int64_t heads,
                           int64_t kv_heads, int64_t dim, int64_t slots, int64_t table_width, int64_t block_size,
                           float scale, int64_t cache_dtype, int64_t threads) {
    const int64_t group = heads / kv_heads;
    const attend_fn attend = find_attend(cache_dtype, dim, group);
    if (attend == NULL) return 1;
    const size_t element = cache_dtype == CACHE_FLOAT32 ? 4 : 2, block_bytes = (size_t)(block_size * dim) * element;
    /* Sequence b's head h: the first blocks of its keys and values, which `attend` does not ask for
     * ahead (it asks for the ones after). Asked for one sequence-head ahead of its turn. */
#define PREFETCH_START(b, h)                                                                                     \
    for (int64_t i = 0; i < PREFETCH_AHEAD && i * block_size < lengths[b]; i++) {                                \
        const size_t at = (size_t)((h) * slots * dim) * element + (size_t)table[(b) * table_width + i] * block_bytes; \
        prefetch_block((const char *)k + at, block_bytes);                                                       \
        prefetch_block((const char *)v + at, block_bytes);                                                       \
    }
    if (batch > 0) PREFETCH_START(0, 0)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int64_t pair = 0; pair < batch * kv_heads; pair++) {
        const int64_t b = pair / kv_heads, h = pair % kv_heads;
        if (pair + 1 < batch * kv_heads) PREFETCH_START((pair + 1) / kv_heads, (pair + 1) % kv_heads)
        const size_t head = (size_t)(h * slots * dim) * element;
        attend(q + rows[b] * q_row + h * group * q_head, q_head, (const char *)k + head, (const char *)v + head,
               table + b * table_width, lengths[b], out + rows[b] * out_row + h * group * out_head, out_head,
               block_size, scale);
    }
    return 0;
}
