/* AMX set-up shared by the kernels that use tiles (built with `build.build_amx`). */
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TILE 16 /* rows of a tile; a tile row is 64 bytes: 16 fp32 or 32 bf16 */

/* Linux hands AMX state to a process only on request; returns 1 when granted. */
int amx_init(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* Tile t: 16 rows of bytes_per_row[t] bytes (none: unused), on the calling thread. */
static void configure_tile_rows(const uint16_t bytes_per_row[8]) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.bytes_per_row[t] = bytes_per_row[t];
        config.rows[t] = bytes_per_row[t] ? TILE : 0;
    }
    __asm__ volatile("" ::: "memory"); /* else GCC 12 may drop the stores above as dead when inlined */
    _tile_loadconfig(&config);
}

/* All eight tiles 16 rows of 64 bytes, on the calling thread. */
static void configure_tiles(void) { configure_tile_rows((const uint16_t[8]){64, 64, 64, 64, 64, 64, 64, 64}); }
