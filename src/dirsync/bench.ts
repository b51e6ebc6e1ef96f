import { randomFillSync } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { MvmError } from '../errors.js';
import { parseAddDirSpec } from './spec.js';
import { discardStaged, stageAddDir } from './stage.js';
import { removeTree } from './host-ops.js';
import { syncBack } from './syncback.js';
import { lastLine, runTool } from '../run-tool.js';

export interface RoundTripBench {
  files: number;
  bytes: number;
  /** Medians over the runs, milliseconds. */
  stageMs: number;
  syncBackMs: number;
  oursMs: number;
  /** mke2fs -d, debugfs rdump, rsync -aH --delete, done by hand on the same tree. */
  byHandMs: number;
  ratio: number;
}

const FILES = 1000;
const BYTES = 100 * 1024 * 1024;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

async function must(cmd: string, args: string[]): Promise<void> {
  const res = await runTool(cmd, args);
  if (res.code !== 0) throw new MvmError(`bench: ${cmd} failed: ${lastLine(res.stderr)}`);
}

/**
 * Times a rw --add-dir round trip with no guest changes (stage, then sync back) of a 100 MB /
 * 1000-file tree created under `dir`, against the same steps done by hand with the same tools.
 * Runs are interleaved so machine noise hits both sides alike.
 */
export async function benchRoundTrip(dir: string, runs = 3): Promise<RoundTripBench> {
  const tree = join(dir, 'tree');
  const state = join(dir, 'state');
  await rm(dir, { recursive: true, force: true });
  const chunk = Buffer.alloc(BYTES / FILES);
  for (let i = 0; i < FILES; i++) {
    if (i % 100 === 0) mkdirSync(join(tree, `d${i / 100}`), { recursive: true });
    writeFileSync(join(tree, `d${Math.floor(i / 100)}`, `f${i}`), randomFillSync(chunk));
  }
  await mkdir(state);
  const spec = parseAddDirSpec(`${tree}:/work:rw`, dir);

  const stage: number[] = [];
  const sync: number[] = [];
  const byHand: number[] = [];
  for (let run = 0; run < runs; run++) {
    let t = performance.now();
    const staged = await stageAddDir(spec, state);
    stage.push(performance.now() - t);
    t = performance.now();
    await syncBack(staged);
    sync.push(performance.now() - t);
    await discardStaged(staged);

    const img = join(state, 'byhand.ext4');
    const out = join(state, 'out');
    t = performance.now();
    await mkdir(out);
    await must('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', tree, img, `${Math.ceil(staged.imageBytes / 1024)}k`]);
    await must('debugfs', ['-R', `rdump / ${out}`, img]);
    await must('rsync', ['-aH', '--delete', `${out}/`, `${tree}/`]);
    await removeTree(out);
    byHand.push(performance.now() - t);
    await rm(img);
  }
  await rm(dir, { recursive: true, force: true });
  const stageMs = median(stage);
  const syncBackMs = median(sync);
  const oursMs = median(stage.map((s, i) => s + sync[i]!));
  const byHandMs = median(byHand);
  return { files: FILES, bytes: BYTES, stageMs, syncBackMs, oursMs, byHandMs, ratio: oursMs / byHandMs };
}
