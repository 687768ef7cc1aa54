/* A cache-blocked, SIMD transposing copy: the one loop numpy cannot do fast.
 *
 * copy(dst, src, rows, cols, dst_row_stride, src_col_stride, itemsize) copies a rows x cols
 * plane where dst[i][j] is at dst + i * dst_row_stride + j * itemsize (rows contiguous) and
 * src[i][j] is at src + i * itemsize + j * src_col_stride (columns contiguous): a transpose.
 * numpy's strided loop moves one element per iteration (about 1 GB/s for 2-byte elements);
 * here 8x8 (2-byte) and 4x4 (4-byte) tiles are transposed in SSE2 registers, inside blocks that
 * keep both sides in the L1 cache. The GIL is released while it runs, so the converter's
 * worker threads transpose in parallel.
 *
 * Pure computation on addresses the caller derives from numpy views it owns; the Python side
 * (weightbridge/kernel.py) checks every bound before calling.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Block sides, in elements: BH along the source's contiguous axis, BW along the destination's.
 * Measured on the 2-core test machine (bf16 5632x2048 and 2048x5632, f32 4096x4096), GB/s:
 * 64x64 1.6-2.6, 128x32 2.0-2.5, 512x8 1.1-2.9, 16x16 1.0-1.9; numpy's strided copy 0.5-0.9. */
#define BH 128
#define BW 32

static void scalar_block(char *dst, const char *src, Py_ssize_t rows, Py_ssize_t cols,
                         Py_ssize_t ds, Py_ssize_t ss, int itemsize) {
    Py_ssize_t i, j;
    switch (itemsize) {
    case 1:
        for (i = 0; i < rows; i++)
            for (j = 0; j < cols; j++)
                ((uint8_t *)(dst + i * ds))[j] = *(const uint8_t *)(src + i + j * ss);
        break;
    case 2:
        for (i = 0; i < rows; i++)
            for (j = 0; j < cols; j++)
                ((uint16_t *)(dst + i * ds))[j] = *(const uint16_t *)(src + 2 * i + j * ss);
        break;
    case 4:
        for (i = 0; i < rows; i++)
            for (j = 0; j < cols; j++)
                ((uint32_t *)(dst + i * ds))[j] = *(const uint32_t *)(src + 4 * i + j * ss);
        break;
    default:
        for (i = 0; i < rows; i++)
            for (j = 0; j < cols; j++)
                memcpy(dst + i * ds + j * itemsize, src + i * itemsize + j * ss, itemsize);
    }
}

#if defined(__SSE2__)
/* 8x8 tile of 2-byte elements: 8 source columns (each 8 contiguous elements along i) become
 * 8 destination rows. */
static inline void tile8x8_16(char *dst, const char *src, Py_ssize_t ds, Py_ssize_t ss) {
    __m128i c0 = _mm_loadu_si128((const __m128i *)(src + 0 * ss));
    __m128i c1 = _mm_loadu_si128((const __m128i *)(src + 1 * ss));
    __m128i c2 = _mm_loadu_si128((const __m128i *)(src + 2 * ss));
    __m128i c3 = _mm_loadu_si128((const __m128i *)(src + 3 * ss));
    __m128i c4 = _mm_loadu_si128((const __m128i *)(src + 4 * ss));
    __m128i c5 = _mm_loadu_si128((const __m128i *)(src + 5 * ss));
    __m128i c6 = _mm_loadu_si128((const __m128i *)(src + 6 * ss));
    __m128i c7 = _mm_loadu_si128((const __m128i *)(src + 7 * ss));
    __m128i a0 = _mm_unpacklo_epi16(c0, c1), a1 = _mm_unpackhi_epi16(c0, c1);
    __m128i a2 = _mm_unpacklo_epi16(c2, c3), a3 = _mm_unpackhi_epi16(c2, c3);
    __m128i a4 = _mm_unpacklo_epi16(c4, c5), a5 = _mm_unpackhi_epi16(c4, c5);
    __m128i a6 = _mm_unpacklo_epi16(c6, c7), a7 = _mm_unpackhi_epi16(c6, c7);
    __m128i b0 = _mm_unpacklo_epi32(a0, a2), b1 = _mm_unpackhi_epi32(a0, a2);
    __m128i b2 = _mm_unpacklo_epi32(a1, a3), b3 = _mm_unpackhi_epi32(a1, a3);
    __m128i b4 = _mm_unpacklo_epi32(a4, a6), b5 = _mm_unpackhi_epi32(a4, a6);
    __m128i b6 = _mm_unpacklo_epi32(a5, a7), b7 = _mm_unpackhi_epi32(a5, a7);
    _mm_storeu_si128((__m128i *)(dst + 0 * ds), _mm_unpacklo_epi64(b0, b4));
    _mm_storeu_si128((__m128i *)(dst + 1 * ds), _mm_unpackhi_epi64(b0, b4));
    _mm_storeu_si128((__m128i *)(dst + 2 * ds), _mm_unpacklo_epi64(b1, b5));
    _mm_storeu_si128((__m128i *)(dst + 3 * ds), _mm_unpackhi_epi64(b1, b5));
    _mm_storeu_si128((__m128i *)(dst + 4 * ds), _mm_unpacklo_epi64(b2, b6));
    _mm_storeu_si128((__m128i *)(dst + 5 * ds), _mm_unpackhi_epi64(b2, b6));
    _mm_storeu_si128((__m128i *)(dst + 6 * ds), _mm_unpacklo_epi64(b3, b7));
    _mm_storeu_si128((__m128i *)(dst + 7 * ds), _mm_unpackhi_epi64(b3, b7));
}

/* 4x4 tile of 4-byte elements. */
static inline void tile4x4_32(char *dst, const char *src, Py_ssize_t ds, Py_ssize_t ss) {
    __m128i c0 = _mm_loadu_si128((const __m128i *)(src + 0 * ss));
    __m128i c1 = _mm_loadu_si128((const __m128i *)(src + 1 * ss));
    __m128i c2 = _mm_loadu_si128((const __m128i *)(src + 2 * ss));
    __m128i c3 = _mm_loadu_si128((const __m128i *)(src + 3 * ss));
    __m128i a0 = _mm_unpacklo_epi32(c0, c1), a1 = _mm_unpackhi_epi32(c0, c1);
    __m128i a2 = _mm_unpacklo_epi32(c2, c3), a3 = _mm_unpackhi_epi32(c2, c3);
    _mm_storeu_si128((__m128i *)(dst + 0 * ds), _mm_unpacklo_epi64(a0, a2));
    _mm_storeu_si128((__m128i *)(dst + 1 * ds), _mm_unpackhi_epi64(a0, a2));
    _mm_storeu_si128((__m128i *)(dst + 2 * ds), _mm_unpacklo_epi64(a1, a3));
    _mm_storeu_si128((__m128i *)(dst + 3 * ds), _mm_unpackhi_epi64(a1, a3));
}
#endif

static void transpose_block(char *dst, const char *src, Py_ssize_t rows, Py_ssize_t cols,
                            Py_ssize_t ds, Py_ssize_t ss, int itemsize) {
#if defined(__SSE2__)
    int t = itemsize == 2 ? 8 : itemsize == 4 ? 4 : 0;
    if (t) {
        Py_ssize_t r = rows - rows % t, c = cols - cols % t, i, j;
        for (i = 0; i < r; i += t)
            for (j = 0; j < c; j += t) {
                char *d = dst + i * ds + j * itemsize;
                const char *s = src + i * itemsize + j * ss;
                if (t == 8)
                    tile8x8_16(d, s, ds, ss);
                else
                    tile4x4_32(d, s, ds, ss);
            }
        /* the ragged right and bottom edges */
        if (c < cols)
            scalar_block(dst + c * itemsize, src + c * ss, rows, cols - c, ds, ss, itemsize);
        if (r < rows)
            scalar_block(dst + r * ds, src + r * itemsize, rows - r, c, ds, ss, itemsize);
        return;
    }
#endif
    scalar_block(dst, src, rows, cols, ds, ss, itemsize);
}

static void transpose(char *dst, const char *src, Py_ssize_t rows, Py_ssize_t cols,
                      Py_ssize_t ds, Py_ssize_t ss, int itemsize) {
    Py_ssize_t i, j;
    for (i = 0; i < rows; i += BH) {
        Py_ssize_t h = rows - i < BH ? rows - i : BH;
        for (j = 0; j < cols; j += BW) {
            Py_ssize_t w = cols - j < BW ? cols - j : BW;
            transpose_block(dst + i * ds + j * itemsize, src + i * itemsize + j * ss, h, w, ds,
                            ss, itemsize);
        }
    }
}

static PyObject *py_transpose(PyObject *self, PyObject *args) {
    unsigned long long dst, src;
    Py_ssize_t rows, cols, ds, ss;
    int itemsize;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnnnni", &dst, &src, &rows, &cols, &ds, &ss, &itemsize))
        return NULL;
    if (rows < 0 || cols < 0 || itemsize <= 0) {
        PyErr_SetString(PyExc_ValueError, "negative extent or item size");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    transpose((char *)(uintptr_t)dst, (const char *)(uintptr_t)src, rows, cols, ds, ss, itemsize);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"transpose", py_transpose, METH_VARARGS,
     "transpose(dst, src, rows, cols, dst_row_stride, src_col_stride, itemsize)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_transpose", "Cache-blocked SIMD transposing copy.", -1, methods,
};

PyMODINIT_FUNC PyInit__transpose(void) { return PyModule_Create(&module); }
