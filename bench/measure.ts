// What every benchmark shares: the CLI under test, interleaved runs, medians, and one report line.
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const repoRoot = fileURLToPath(new URL('../../', import.meta.url));
export const mvmctl = join(repoRoot, 'bin', 'mvmctl');
export const RUNS = Number(process.env.BENCH_RUNS || 7);

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

export function run(command: string, args: string[], env: NodeJS.ProcessEnv = process.env, onStdout?: (chunk: Buffer) => void): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'inherit'] });
    child.stdout.on('data', (chunk: Buffer) => onStdout?.(chunk));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(code) : reject(new Error(`${command} ${args.join(' ')} exited ${code}`))));
  });
}

export async function timed(work: () => Promise<unknown>): Promise<number> {
  const start = performance.now();
  await work();
  return (performance.now() - start) / 1000;
}

/** `target` bounds the ratio from above, or from below with `higherIsBetter` (throughput). */
export function report(what: string, value: number, baselineName: string, baseline: number, target: number | undefined, higherIsBetter = false): void {
  const ratio = value / baseline;
  console.log(
    `${what}: ${value.toFixed(3)} vs ${baselineName}: ${baseline.toFixed(3)} -> ratio ${ratio.toFixed(2)}` +
      (target === undefined ? '' : ` (target ${higherIsBetter ? '>=' : '<='} ${target.toFixed(2)})`),
  );
}

/** Runs `command` with stdout drained and returns its peak resident set (VmHWM) in MB, read from /proc while it runs. */
export async function peakRssMb(command: string, args: string[], env: NodeJS.ProcessEnv): Promise<number> {
  const child = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'inherit'] });
  child.stdout.resume();
  let peakKb = 0;
  const sample = () => {
    try {
      const hwm = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'));
      if (hwm) peakKb = Math.max(peakKb, Number(hwm[1]));
    } catch {
      // gone already: the last sample stands
    }
  };
  const timer = setInterval(sample, 50);
  const code = await new Promise<number | null>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', resolve);
  });
  clearInterval(timer);
  if (code !== 0) throw new Error(`${command} ${args.join(' ')} exited ${code}`);
  return peakKb / 1024;
}

/**
 * The VM's share of one `mvmctl -v` run (`args` without -v): seconds from mvmctl starting the VMM
 * to the agent's answer (restored or booted), read from its [timing] lines.
 */
export async function agentReadySeconds(args: string[], env: NodeJS.ProcessEnv): Promise<number> {
  const [command, ...rest] = args;
  return new Promise((resolve, reject) => {
    const child = spawn(mvmctl, [command!, '-v', ...rest], { env, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      const start = /\[timing\] host prepared, starting the VMM: .*\(([\d.]+) s total\)/.exec(stderr);
      const ready = /\[timing\] (?:restored from snapshot, )?agent ready .*\(([\d.]+) s total\)/.exec(stderr);
      if (code !== 0 || !start || !ready) reject(new Error(`mvmctl ${args.join(' ')} -v exited ${code}: ${stderr.slice(-500)}`));
      else resolve(Number(ready[1]) - Number(start[1]));
    });
  });
}
