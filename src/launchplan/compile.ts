/**
 * `mvmctl compile`: turns a Workload IR manifest into launch.json artifacts that `loadLaunchPlan`
 * reads back as the same argv, cwd and env.
 */
import { mkdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { MvmError } from '../errors.js';
import { writeFileAtomic } from '../fs-atomic.js';
import { formatJsonPath, readPlanFile } from './read.js';
import { UNNAMED_APP, type App, type Artifact } from './schema.js';

/** The artifact format version compile writes; `loadLaunchPlan` accepts any 1.x. */
const ARTIFACT_FORMAT_VERSION = '1.0';

export interface CompileResult {
  /** The launch.json files written, under `outDir` as the caller spelled it, in manifest order. */
  files: string[];
  /** JSON paths of manifest fields that are not carried into the artifacts. */
  ignoredFields: string[];
}

/**
 * Writes `outDir/launch.json` for a single-app manifest (workload_id `app` when the app has no name),
 * `outDir/<app>/launch.json` per app otherwise.
 * Everything is validated before anything is written, and each file is replaced atomically, so a re-run
 * over the same output gives the same bytes and a reader never sees a half-written file. Files from an
 * earlier run that the manifest no longer produces are left alone.
 */
export async function compileManifest(manifestPath: string, outDir: string): Promise<CompileResult> {
  const label = `manifest ${manifestPath}`;
  const file = await readPlanFile(manifestPath, label);
  if (file.shape === 'artifact') {
    throw new MvmError(
      `${label}: is a launch.json artifact (top-level "entrypoint"), not a Workload IR manifest (top-level "apps"); ` +
        `it needs no compiling: pass it to \`mvmctl exec --launch-plan\``,
    );
  }
  const { apps } = file.manifest;
  const dirs = apps.length > 1 ? directoryNames(apps, label).map((name) => join(outDir, name)) : [outDir];

  await ensureDirectory(outDir);
  const files: string[] = [];
  for (const [i, app] of apps.entries()) {
    const dir = dirs[i]!;
    if (dir !== outDir) await ensureDirectory(dir);
    const target = join(dir, 'launch.json');
    await writeAtomically(target, `${JSON.stringify(toArtifact(app), null, 2)}\n`);
    files.push(target);
  }
  return { files, ignoredFields: file.ignoredFields };
}

function toArtifact(app: App): Artifact {
  const { command, working_dir, env } = app.entrypoint;
  return {
    artifact_format_version: ARTIFACT_FORMAT_VERSION,
    workload_id: app.name ?? UNNAMED_APP,
    // An absent working_dir stays absent rather than becoming "/", so the artifact says what the manifest said.
    entrypoint: { command, ...(working_dir === undefined ? {} : { working_dir }), env: env ?? {} },
    env: app.env ?? {},
  };
}

/** In a multi-app manifest each name becomes a directory under `--out`, so it must be given, and be one safe, unique path component. */
function directoryNames(apps: App[], label: string): string[] {
  const seen = new Map<string, number>();
  return apps.map((app, i) => {
    const at = `${label}: ${formatJsonPath(['apps', i, 'name'])}`;
    const { name } = app;
    if (name === undefined) throw new MvmError(`${at}: required when the manifest has several apps (each app's name is its output directory)`);
    if (name === '.' || name === '..' || /[/\\\0]/.test(name)) {
      throw new MvmError(
        `${at}: ${JSON.stringify(name)} cannot name the app's output directory (no "/", "\\" or NUL; not "." or "..")`,
      );
    }
    const earlier = seen.get(name);
    if (earlier !== undefined) {
      throw new MvmError(`${at}: ${JSON.stringify(name)} is also the name of apps[${earlier}]; app names must be unique`);
    }
    seen.set(name, i);
    return name;
  });
}

async function ensureDirectory(dir: string): Promise<void> {
  const existing = await stat(dir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return undefined;
    throw new MvmError(`output directory ${dir}: ${err.message}`);
  });
  if (existing && !existing.isDirectory()) throw new MvmError(`output directory ${dir}: exists and is not a directory`);
  if (existing) return;
  try {
    await mkdir(dir, { recursive: true });
  } catch (err) {
    throw new MvmError(`output directory ${dir}: cannot create directory: ${(err as Error).message}`);
  }
}

async function writeAtomically(target: string, content: string): Promise<void> {
  await writeFileAtomic(target, content).catch((err: Error) => {
    throw new MvmError(`cannot write ${target}: ${err.message}`);
  });
}
