#!/usr/bin/env python3
"""Writes crates/rsa-mb/src/ifma/unrolled.rs: straight-line AVX-512 IFMA kernels.

Run from anywhere: python3 crates/rsa-mb/tools/gen_unrolled.py (then the file is rustfmt'ed).

Why generated: a kernel keeps its accumulators in registers only if every index is a
constant, and the squaring's rows shrink as they go (row i multiplies a_i by a_i..a_{N-1}),
which a rolled loop cannot express with constant indices. Each column of the double-width
product gets its own variable (c0 .. c{2N-1}); rows and reduction steps are interleaved so
only about N+1 columns are live at once. No variable is ever moved: the "shift one limb
down" of the rolled CIOS loop becomes a change of name.

Both kernels compute Almost Montgomery products a*b/R mod m (R = 2^(52N)), result below 2m
for inputs below 2m, limbs normalized to 52 bits:
- ammN: row i adds a_i * b_j into columns i+j (low half) and i+j+1 (high half);
- amsN: row i adds a_i * a_i once and a_i * (2a)_j for j > i, where 2a is taken limb-wise
  from the doubled number (limb i+1 without the bit carried from limb i, which belongs to
  the product with a_i itself), so each cross product is computed once instead of twice.
Reduction step i: y = c_i * k0 mod 2^52; add y * m_j into columns i+j and i+j+1; carry
c_i's bits above 52 into c_{i+1}.
"""

import os
import subprocess

SIZES = (20, 30, 40)


def kernel(name, n, square):
    out = []
    emit = out.append
    if square:
        emit(f"/// Almost Montgomery squaring, {n} limbs, straight-line (see the module docs).")
        emit("#[target_feature(enable = \"avx512f,avx512ifma\")]")
        emit(f"pub(super) fn {name}(out: &mut Num<{n}>, a: &Num<{n}>, m: &Num<{n}>, k0: &L8) {{")
    else:
        emit(f"/// Almost Montgomery multiplication, {n} limbs, straight-line (see the module docs).")
        emit("#[target_feature(enable = \"avx512f,avx512ifma\")]")
        emit(
            f"pub(super) fn {name}(out: &mut Num<{n}>, a: &Num<{n}>, b: &Num<{n}>, m: &Num<{n}>, k0: &L8) {{"
        )
    emit("let zero = _mm512_setzero_si512();")
    emit("let k0 = load(k0);")
    emit("let mask = _mm512_set1_epi64(MASK as i64);")
    cols = 2 * n
    emit("let (" + ", ".join(f"mut c{k}" for k in range(cols)) + ") = (" + ", ".join("zero" for _ in range(cols)) + ");")
    if square:
        # a2[j]: limb j of 2a; d[j]: limb j of 2a without the bit from limb j-1. Computed
        # once into stack arrays; LLVM keeps what fits in registers and spills the rest (a
        # black_box per row, as for m, measured slower here).
        emit(f"let mut d = [L8::ZERO; {n}];")
        emit(f"let mut a2 = [L8::ZERO; {n}];")
        emit("let mut prev = zero;")
        emit(f"for j in 0..{n} {{")
        emit("let aj = load(&a[j]);")
        emit("let dj = _mm512_and_si512(_mm512_slli_epi64::<1>(aj), mask);")
        emit("store(&mut d[j], dj);")
        emit("store(&mut a2[j], _mm512_or_si512(dj, _mm512_srli_epi64::<51>(prev)));")
        emit("prev = aj;")
        emit("}")
    for i in range(n):
        emit(f"// row {i}")
        # An opaque copy of each pointer per row: LLVM may not merge this row's loads with
        # another row's, which would keep every limb of b and m live in registers (and spill).
        emit("let m = black_box(m);")
        if square:
            terms = [(i, "a", i)] + [(j, "d" if j == i + 1 else "a2", j) for j in range(i + 1, n)]
        else:
            emit("let b = black_box(b);")
            terms = [(j, "b", j) for j in range(n)]
        emit(f"let ai = load(&a[{i}]);")
        if square:
            # Column i is complete before row i's own products, which start at column 2i,
            # except in row 0: y first, then the reduction's products interleaved with the
            # row's squares, which do not wait for y.
            sq = terms
            if i == 0:
                emit("let t = load(&a[0]);")
                emit("c0 = _mm512_madd52lo_epu64(c0, ai, t);")
                emit("c1 = _mm512_madd52hi_epu64(c1, ai, t);")
                sq = terms[1:]
            emit(f"let y = _mm512_madd52lo_epu64(zero, c{i}, k0);")
            emit("let mj = load(&m[0]);")
            emit(f"c{i} = _mm512_madd52lo_epu64(c{i}, y, mj);")
            emit(f"c{i + 1} = _mm512_add_epi64(c{i + 1}, _mm512_srli_epi64::<52>(c{i}));")
            emit(f"c{i + 1} = _mm512_madd52hi_epu64(c{i + 1}, y, mj);")
            for k in range(max(n - 1, len(sq))):
                if k < n - 1:
                    emit(f"let mj = load(&m[{k + 1}]);")
                    emit(f"c{i + k + 1} = _mm512_madd52lo_epu64(c{i + k + 1}, y, mj);")
                    emit(f"c{i + k + 2} = _mm512_madd52hi_epu64(c{i + k + 2}, y, mj);")
                if k < len(sq):
                    j, arr, idx = sq[k]
                    emit(f"let t = load(&{arr}[{idx}]);")
                    emit(f"c{i + j} = _mm512_madd52lo_epu64(c{i + j}, ai, t);")
                    emit(f"c{i + j + 1} = _mm512_madd52hi_epu64(c{i + j + 1}, ai, t);")
            continue
        # The multiplication: column i's last term (a_i * b_0) and y first, then the row's
        # products and the reduction's (interleaving them measured slower here).
        j0, arr0, idx0 = terms[0]
        emit(f"let t = load(&{arr0}[{idx0}]);")
        emit(f"c{i + j0} = _mm512_madd52lo_epu64(c{i + j0}, ai, t);")
        emit(f"let y = _mm512_madd52lo_epu64(zero, c{i}, k0);")
        emit(f"let mj = load(&m[0]);")
        emit(f"c{i} = _mm512_madd52lo_epu64(c{i}, y, mj);")
        emit(f"c{i + 1} = _mm512_add_epi64(c{i + 1}, _mm512_srli_epi64::<52>(c{i}));")
        emit(f"c{i + j0 + 1} = _mm512_madd52hi_epu64(c{i + j0 + 1}, ai, t);")
        emit(f"c{i + 1} = _mm512_madd52hi_epu64(c{i + 1}, y, mj);")
        for j, arr, idx in terms[1:]:
            emit(f"let t = load(&{arr}[{idx}]);")
            emit(f"c{i + j} = _mm512_madd52lo_epu64(c{i + j}, ai, t);")
            emit(f"c{i + j + 1} = _mm512_madd52hi_epu64(c{i + j + 1}, ai, t);")
        for j in range(1, n):
            emit(f"let mj = load(&m[{j}]);")
            emit(f"c{i + j} = _mm512_madd52lo_epu64(c{i + j}, y, mj);")
            emit(f"c{i + j + 1} = _mm512_madd52hi_epu64(c{i + j + 1}, y, mj);")
    emit("// normalize the upper half into the result")
    for k in range(n, cols - 1):
        emit(f"c{k + 1} = _mm512_add_epi64(c{k + 1}, _mm512_srli_epi64::<52>(c{k}));")
        emit(f"store(&mut out[{k - n}], _mm512_and_si512(c{k}, mask));")
    emit(f"store(&mut out[{n - 1}], c{cols - 1});")
    emit("}")
    return "\n".join(out)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    target = os.path.join(here, "..", "src", "ifma", "unrolled.rs")
    parts = [
        "//! Straight-line AVX-512 IFMA kernels for the CRT exponentiations' sizes.",
        "//!",
        "//! GENERATED by `crates/rsa-mb/tools/gen_unrolled.py`: edit the generator, not this file.",
        "//! The algorithm is described there; `tests` in the parent module compare every kernel",
        "//! with the portable one.",
        "",
        "#![allow(clippy::too_many_lines, clippy::similar_names, unused_assignments)]",
        "",
        "use core::arch::x86_64::{",
        "    _mm512_add_epi64, _mm512_and_si512, _mm512_madd52hi_epu64, _mm512_madd52lo_epu64,",
        "    _mm512_or_si512, _mm512_set1_epi64, _mm512_setzero_si512, _mm512_slli_epi64,",
        "    _mm512_srli_epi64,",
        "};",
        "",
        "use core::hint::black_box;",
        "",
        "use super::{load, store};",
        "use crate::kernel::{Num, L8};",
        "use crate::num::MASK;",
        "",
    ]
    for n in SIZES:
        parts.append(kernel(f"amm{n}", n, False))
        parts.append("")
        parts.append(kernel(f"ams{n}", n, True))
        parts.append("")
    with open(target, "w") as f:
        f.write("\n".join(parts))
    subprocess.run(["rustfmt", "--edition", "2021", target], check=True)


if __name__ == "__main__":
    main()
