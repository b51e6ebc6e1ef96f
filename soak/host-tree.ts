// The rw `--add-dir` HOST of the signal soak: a few hundred files, the guest command that changes
// them, and the tree that command must leave once synced back, all known in advance so that after
// any interruption HOST can be classified as untouched, fully synced, or a mix of the two.
import { createHash } from 'node:crypto';
import { chmodSync, lstatSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

type Entry = { type: 'dir'; mode: number } | { type: 'file'; mode: number; content: Buffer };
/** Relative path ('' for HOST itself) to entry. */
export type TreeModel = Map<string, Entry>;

const pad = (i: number) => String(i).padStart(3, '0');
const CHMODDED = 'd/f007';

/** `files` files under d/ (the command appends to each), a few it deletes, and a subtree it leaves alone. */
export function fixtureTree(files: number): TreeModel {
  const tree: TreeModel = new Map();
  tree.set('', { type: 'dir', mode: 0o755 });
  tree.set('d', { type: 'dir', mode: 0o755 });
  for (let i = 0; i < files; i++) {
    tree.set(`d/f${pad(i)}`, { type: 'file', mode: i % 10 === 3 ? 0o600 : 0o644, content: Buffer.from(`file ${i}\n`.repeat(1 + (i % 7))) });
  }
  for (let i = 0; i < 20; i++) tree.set(`gone-${pad(i)}`, { type: 'file', mode: 0o644, content: Buffer.from(`doomed ${i}\n`) });
  tree.set('keep', { type: 'dir', mode: 0o750 });
  tree.set('keep/same.txt', { type: 'file', mode: 0o644, content: Buffer.from('untouched\n') });
  return tree;
}

/** What the guest does to HOST (mounted at /work), as busybox sh. Markers on stdout say how far it got. */
export const CHANGING_MARKER = 'SOAK-CHANGING';
export const CHANGED_MARKER = 'SOAK-CHANGED';
export const GUEST_CHANGES = [
  `echo ${CHANGING_MARKER}`,
  'for f in /work/d/*; do echo changed >> "$f"; done',
  'rm /work/gone-*',
  'echo new > /work/new.txt',
  'chmod 640 /work/new.txt',
  `chmod 600 /work/${CHMODDED}`,
  `echo ${CHANGED_MARKER}`,
].join('\n');

/** The fixture after GUEST_CHANGES, i.e. what a complete sync-back must produce. */
export function syncedTree(fixture: TreeModel): TreeModel {
  const tree: TreeModel = new Map();
  for (const [path, entry] of fixture) {
    if (path.startsWith('gone-')) continue;
    if (entry.type === 'file' && path.startsWith('d/')) {
      tree.set(path, { type: 'file', mode: path === CHMODDED ? 0o600 : entry.mode, content: Buffer.concat([entry.content, Buffer.from('changed\n')]) });
    } else tree.set(path, entry);
  }
  tree.set('new.txt', { type: 'file', mode: 0o640, content: Buffer.from('new\n') });
  return tree;
}

export function writeTree(root: string, tree: TreeModel): void {
  for (const [path, entry] of tree) {
    const full = join(root, path);
    if (entry.type === 'dir') mkdirSync(full, { recursive: true });
    else writeFileSync(full, entry.content);
    // Explicit modes, so that neither the umask nor mkdir's defaults decide what "identical" means.
    chmodSync(full, entry.mode);
  }
}

/** One line per entry: path, type, mode, and for files size and sha256. */
export function treeManifest(tree: TreeModel): string[] {
  const lines: string[] = [];
  for (const [path, entry] of tree) {
    const head = `${JSON.stringify(path)} ${entry.type} ${entry.mode.toString(8)}`;
    lines.push(entry.type === 'dir' ? head : `${head} ${entry.content.length} ${sha256(entry.content)}`);
  }
  return lines.sort();
}

/** The same manifest read from disk; anything but a directory or regular file shows as itself and never matches. */
export function diskManifest(root: string): string[] {
  const lines: string[] = [];
  const walk = (rel: string) => {
    const full = join(root, rel);
    const st = lstatSync(full);
    const head = `${JSON.stringify(rel)} ${st.isDirectory() ? 'dir' : st.isFile() ? 'file' : 'other'} ${(st.mode & 0o7777).toString(8)}`;
    if (st.isDirectory()) {
      lines.push(head);
      for (const name of readdirSync(full)) walk(rel === '' ? name : `${rel}/${name}`);
    } else if (st.isFile()) {
      const content = readFileSync(full);
      lines.push(`${head} ${content.length} ${sha256(content)}`);
    } else lines.push(head);
  };
  walk('');
  return lines.sort();
}

/** The JSON-quoted path a manifest line starts with. */
const pathOf = (line: string): string => line.slice(0, line.indexOf('" ') + 1);

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

export type HostVerdict = 'identical' | 'synced' | 'mixed';

/** HOST must be exactly as before or exactly fully synced; for a mix, `detail` says how it is mixed. */
export function classifyHost(root: string, before: string[], synced: string[]): { verdict: HostVerdict; detail: string } {
  const now = diskManifest(root);
  const same = (a: string[]) => a.length === now.length && a.every((line, i) => line === now[i]);
  if (same(before)) return { verdict: 'identical', detail: '' };
  if (same(synced)) return { verdict: 'synced', detail: '' };
  const [wasBefore, wasSynced] = [new Set(before), new Set(synced)];
  const asBefore = now.filter((line) => wasBefore.has(line) && !wasSynced.has(line)).length;
  const asSynced = now.filter((line) => wasSynced.has(line) && !wasBefore.has(line)).length;
  const neither = now.filter((line) => !wasBefore.has(line) && !wasSynced.has(line));
  const paths = new Set(now.map(pathOf));
  const gone = before.filter((line) => !paths.has(pathOf(line))).length;
  const examples = neither.length ? ` (${neither.slice(0, 3).join('; ')})` : '';
  return { verdict: 'mixed', detail: `${asBefore} entries as before, ${asSynced} as synced, ${gone} of the original gone, ${neither.length} neither${examples}` };
}
