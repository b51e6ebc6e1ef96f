/**
 * Where templates live and how they are replaced atomically.
 *
 * Layout under `<dataDir>/templates/`:
 *   NAME -> .NAME.v-<pid>-<rand>        symlink to the template's current version
 *   .NAME.v-<pid>-<rand>/
 *     template.json                      TemplateMeta (written last)
 *     vmlinux, initramfs.cpio            the kernel and first-stage initramfs it boots
 *     rootfs.ext4                        the root drive (not for templates of the default image)
 *     snapshot -> snap-<pid>-<rand>      symlink to the current snapshot, if any
 *     snap-<pid>-<rand>/                 snapshot.json, ram, state, disk.* (the backend's), slot0…
 *
 * A build or snapshot is written into a directory of its own and published by renaming a new symlink
 * over the old one (rename(2) is atomic), so readers see the old version or the new one, never a mix,
 * and an interrupted build leaves the old template as it was. Directories a dead process left behind
 * (its pid is in the name) are removed by the next template command.
 */
import type { NetMode } from '../net/spec.js';
import { lstat, mkdir, readdir, readFile, readlink, realpath, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { MvmError } from '../errors.js';
import { workName } from '../fs-atomic.js';
import { removeSnapshotLeftovers } from '../snapshots/index.js';
import { pidAlive } from '../image/lock.js';
import { dataDir, expandHome } from '../paths.js';
import { listVms } from '../state/registry.js';
import { TEMPLATE_MARKER_FILE } from '../vm/index.js';

export const TEMPLATE_META_FILE = 'template.json';

export interface FileRecord {
  file: string;
  size: number;
  sha256: string;
}

export type TemplateSource =
  | { kind: 'default' }
  | { kind: 'rootfs-dir'; path: string }
  | { kind: 'rootfs-tar'; path: string };

export interface TemplateMeta {
  format: 1;
  name: string;
  createdAt: string;
  source: TemplateSource;
  /** Defaults for `exec --manifest` (and the size the snapshot is taken at). */
  cpus: number;
  memoryMiB: number;
  /** The network `exec --manifest` gives the guest unless --net says otherwise; absent: none. Snapshots are taken without a NIC. */
  net?: NetMode;
  kernel: FileRecord & { origin: string };
  initrd: FileRecord;
  rootfs?: FileRecord & { entries: number; contentBytes: number };
  kernelArgs: string[];
  agentVersion?: string;
  /** Bumped when the boot design (init scripts, reserved paths) changes. */
  layoutVersion: number;
}

export interface Template {
  name: string;
  /** The version directory (a real path, stable while this version exists). */
  dir: string;
  meta: TemplateMeta;
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

export function validateTemplateName(name: string): void {
  if (!NAME_RE.test(name) || name.includes('..')) {
    throw new MvmError(`'${name}' is not a valid template name: use letters, digits, '.', '_' and '-' (at most 64, not starting with '.' or '-')`);
  }
}

export function templatesDir(): string {
  return join(dataDir(), 'templates');
}

export function versionDirName(name: string): string {
  return workName(`.${name}.v-`);
}

async function readMeta(dir: string): Promise<TemplateMeta | undefined> {
  try {
    const meta = JSON.parse(await readFile(join(dir, TEMPLATE_META_FILE), 'utf8')) as TemplateMeta;
    return meta && meta.format === 1 && typeof meta.name === 'string' ? meta : undefined;
  } catch {
    return undefined;
  }
}

/** The template called `name`, or undefined. */
export async function findTemplate(name: string): Promise<Template | undefined> {
  if (!NAME_RE.test(name)) return undefined;
  const link = join(templatesDir(), name);
  const info = await lstat(link).catch(() => undefined);
  if (!info?.isSymbolicLink()) return undefined;
  const dir = await realpath(link).catch(() => undefined);
  if (!dir) return undefined;
  const meta = await readMeta(dir);
  return meta ? { name, dir, meta } : undefined;
}

export async function listTemplates(): Promise<Template[]> {
  const names = await readdir(templatesDir()).catch(() => [] as string[]);
  const found: Template[] = [];
  for (const name of names.sort()) {
    if (name.startsWith('.')) continue;
    const template = await findTemplate(name);
    if (template) found.push(template);
  }
  return found;
}

/** The template, or an MvmError (exit 125) that lists the templates there are. */
export async function requireTemplate(name: string): Promise<Template> {
  const template = await findTemplate(name);
  if (template) return template;
  const names = (await listTemplates()).map((t) => t.name);
  throw new MvmError(
    `no template named '${name}' ` +
      (names.length ? `(templates: ${names.join(', ')})` : `(there are none yet: create one with 'mvmctl template build ${NAME_RE.test(name) ? name : 'NAME'}')`),
  );
}

/**
 * The template `ref` names, as `exec --template`/`-m` takes it: a template's name, or (when it holds a
 * `/` or starts with `.`, which no name does) the path of a template directory: a version directory
 * with its template.json, or a NAME symlink to one. An MvmError (exit 125) names what is wrong.
 */
export async function openTemplate(ref: string): Promise<Template> {
  if (!ref.includes('/') && !ref.startsWith('.')) return requireTemplate(ref);
  const dir = await realpath(expandHome(ref)).catch(() => undefined);
  if (!dir) throw new MvmError(`template directory ${ref} does not exist`);
  const meta = await readMeta(dir);
  if (!meta) {
    throw new MvmError(`${ref} is not a template directory: it holds no template.json of a template (templates are in ${templatesDir()}; make one with 'mvmctl template build NAME')`);
  }
  return { name: meta.name, dir, meta };
}

/** Names of running VMs started from `dir` (a template version directory). */
export async function vmsUsing(dir: string): Promise<string[]> {
  const users: string[] = [];
  for (const vm of await listVms()) {
    const marker = await readFile(join(vm.runDir, TEMPLATE_MARKER_FILE), 'utf8').catch(() => '');
    if (marker.trim() === dir) users.push(vm.name);
  }
  return users;
}

function ownerPid(entry: string): number | undefined {
  const match = /-(\d+)-[0-9a-f]+$/.exec(entry);
  return match ? Number(match[1]) : undefined;
}

/**
 * Removes what interrupted builds left behind: version directories no symlink points to, unpublished
 * snapshot directories and half-made symlinks, whose creating process is gone.
 */
export async function collectGarbage(): Promise<void> {
  const root = templatesDir();
  const entries = await readdir(root).catch(() => [] as string[]);
  const live = new Set<string>();
  for (const entry of entries) {
    if (entry.startsWith('.')) continue;
    const target = await readlink(join(root, entry)).catch(() => undefined);
    if (target) live.add(target);
  }
  for (const entry of entries) {
    const pid = ownerPid(entry);
    if (pid === undefined || pidAlive(pid)) continue;
    // An old version still used by a running VM is kept until that VM is gone.
    if (entry.startsWith('.') && !live.has(entry) && !entry.includes('.new-') && (await vmsUsing(join(root, entry))).length > 0) continue;
    if ((entry.startsWith('.') && !live.has(entry)) || entry.includes('.new-')) {
      await rm(join(root, entry), { recursive: true, force: true }).catch(() => {});
    }
  }
  for (const target of live) await removeSnapshotLeftovers(join(root, target));
}

export async function ensureTemplatesDir(): Promise<string> {
  const root = templatesDir();
  await mkdir(root, { recursive: true });
  return root;
}

/**
 * Removes a template. Refused (exit 1) while a VM started from it runs, unless `force`: those VMs
 * keep working even then, because the VMM holds its files open (they are unlinked, not truncated).
 */
export async function removeTemplate(name: string, force: boolean): Promise<void> {
  const template = await requireTemplate(name);
  const users = await vmsUsing(template.dir);
  if (users.length > 0 && !force) {
    throw new MvmError(
      `template '${name}' is in use by ${users.join(', ')}: wait for ${users.length > 1 ? 'them' : 'it'} to finish, stop ${users.length > 1 ? 'them' : 'it'} with 'mvmctl down', or pass --force`,
      1,
    );
  }
  const link = join(templatesDir(), name);
  // Unpublish first (new runs no longer find it), then delete the files.
  await rm(link, { force: true });
  await rm(template.dir, { recursive: true, force: true });
}
