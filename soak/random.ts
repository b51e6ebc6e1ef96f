/** mulberry32: small and seeded, so a failing soak run can be replayed from the seed it printed. */
export type Random = () => number;

export function seededRandom(seed: number): Random {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** An integer in [0, n). */
export function below(rand: Random, n: number): number {
  return Math.floor(rand() * n);
}

export function pick<T>(rand: Random, items: readonly T[]): T {
  return items[below(rand, items.length)]!;
}

export function randomBytes(rand: Random, n: number): Buffer {
  const out = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) out[i] = below(rand, 256);
  return out;
}
