/** A seeded PRNG (mulberry32). Tests print the seed so a failure can be replayed. */
export function seededRng(label: string, seed = Number(process.env.COFFER_SEED ?? Math.floor(Math.random() * 2 ** 31))) {
  // eslint-disable-next-line no-console
  console.log(`[${label}] seed=${seed} (replay with COFFER_SEED=${seed})`);
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return { seed, next, int: (lo: number, hi: number) => lo + Math.floor(next() * (hi - lo + 1)) };
}
