/**
 * A value read from storage and trusted for a short time: hot paths (every pushed batch, every
 * shipping step) ask for it, and this process forgets it at once when it changes it. A change
 * made by another process is seen within `ttlMs`; callers say why that is safe.
 */
export class Remembered<T> {
  private held: { at: number; value: T } | null = null;

  constructor(private readonly ttlMs: number) {}

  /** The remembered value, or `load()`'s (remembered if it returns; nothing if it throws). */
  async get(load: () => Promise<T>): Promise<T> {
    const h = this.held;
    if (h && Date.now() - h.at < this.ttlMs) return h.value;
    const value = await load();
    this.held = { at: Date.now(), value };
    return value;
  }

  forget(): void {
    this.held = null;
  }
}
