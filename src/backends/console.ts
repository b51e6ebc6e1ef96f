import { StringDecoder } from 'node:string_decoder';

const MAX_LINES = 200;
const MAX_LINE_BYTES = 4096;

/**
 * Keeps the last lines a guest printed on its console, bounded in count and length: the guest is
 * untrusted and may print without end, but a failed boot needs its last words shown.
 */
export class ConsoleBuffer {
  private readonly lines: string[] = [];
  private partial = '';
  /** Keeps a character that a chunk boundary split for the next chunk. */
  private readonly decoder = new StringDecoder('utf8');

  push(chunk: Buffer, onLine?: (line: string) => void): void {
    const parts = (this.partial + this.decoder.write(chunk)).split('\n');
    this.partial = parts.pop()!.slice(-MAX_LINE_BYTES);
    for (const raw of parts) {
      const line = raw.replace(/\r$/, '').slice(0, MAX_LINE_BYTES);
      this.lines.push(line);
      if (this.lines.length > MAX_LINES) this.lines.shift();
      onLine?.(line);
    }
  }

  tail(maxLines: number): string[] {
    const all = this.partial ? [...this.lines, this.partial] : this.lines;
    return all.slice(-maxLines);
  }
}
