import { createHash } from 'node:crypto';
import { readFileSync, readlinkSync } from 'node:fs';
import { joinRel, walkHost } from './host-tree.js';

/**
 * One line per entry of a directory tree: path, type, mode, owner, mtime in ns, size, hard-link
 * group, symlink target and content hash. Two trees are "byte-identical" for --add-dir when their
 * manifests are equal; tests compare manifests, and `treeDigest` condenses one to a hash for
 * before/after checks (e.g. that a discarded run left HOST untouched).
 */
export function treeManifest(root: string, options: { mtime?: 'ns' | 'us' } = {}): string[] {
  const entries = walkHost(root).sort((a, b) => Buffer.compare(a.rel, b.rel));
  const firstPathOfInode = new Map<bigint, string>();
  const lines: string[] = [];
  for (const { rel, stat: st } of entries) {
    const path = JSON.stringify(rel.toString('utf8')) + (rel.toString('utf8').includes('\ufffd') ? `#${rel.toString('hex')}` : '');
    const mtime = options.mtime === 'us' ? st.mtimeNs / 1_000n : st.mtimeNs;
    const type = st.isDirectory() ? 'd' : st.isFile() ? 'f' : st.isSymbolicLink() ? 'l' : st.isFIFO() ? 'p' : st.isSocket() ? 's' : 'x';
    let detail = '';
    if (st.isFile()) {
      const group = firstPathOfInode.get(st.ino);
      if (group === undefined) firstPathOfInode.set(st.ino, path);
      detail = `${st.size} ${group ? `link=${group}` : createHash('sha256').update(readFileSync(joinRel(root, rel))).digest('hex')}`;
    } else if (st.isSymbolicLink()) {
      detail = `-> ${JSON.stringify(readlinkSync(joinRel(root, rel), { encoding: 'buffer' }).toString('latin1'))}`;
    }
    // The root's own mtime is part of the tree: sync-back sets it too.
    lines.push(`${path} ${type} ${(st.mode & 0o7777n).toString(8)} ${st.uid}:${st.gid} ${mtime} ${detail}`.trimEnd());
  }
  return lines;
}

export function treeDigest(root: string): string {
  return createHash('sha256').update(treeManifest(root).join('\n')).digest('hex');
}
