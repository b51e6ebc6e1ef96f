import { readFileSync } from 'node:fs';
import { Command, CommanderError } from 'commander';
import { EXIT_MVM_FAILURE, MvmError } from '../errors.js';
import { compileCommand } from './compile.js';
import { doctorCommand } from './doctor.js';
import { execCommand } from './exec.js';
import { imageCommand } from './image.js';
import { templateCommand } from './template.js';
import { consoleCommand, superviseCommand, upCommand } from './up.js';
import { downCommand, lsCommand } from './vms.js';

const packageJson = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };

function program(): Command {
  const root = new Command('mvmctl')
    .description('Run one command in a fresh, disposable microVM and tear it down')
    .version(packageJson.version, '--version')
    .enablePositionalOptions()
    .showHelpAfterError(false);
  for (const command of [execCommand(), upCommand(), consoleCommand(), lsCommand(), downCommand(), imageCommand(), templateCommand(), compileCommand(), doctorCommand()]) root.addCommand(command);
  root.addCommand(superviseCommand(), { hidden: true });
  // Commander's own usage errors become one `mvmctl: …` line and exit 125, like every other failure of mvmctl itself.
  const configure = (command: Command) => {
    command.exitOverride().configureOutput({ outputError: () => {} });
    command.commands.forEach(configure);
  };
  configure(root);
  return root;
}

function report(error: unknown): number {
  if (error instanceof CommanderError) {
    if (error.exitCode === 0) return 0;
    process.stderr.write(`mvmctl: ${error.message.replace(/^error: /, '')}\n`);
    return EXIT_MVM_FAILURE;
  }
  if (error instanceof MvmError) {
    process.stderr.write(`mvmctl: ${error.message}\n`);
    for (const line of error.details) process.stderr.write(`  | ${line}\n`);
    return error.exitCode;
  }
  const message = error instanceof Error ? error.message : String(error);
  process.stderr.write(`mvmctl: internal error: ${message} (set MVM_DEBUG=1 for details)\n`);
  if (process.env.MVM_DEBUG === '1' && error instanceof Error) process.stderr.write(`${error.stack}\n`);
  return EXIT_MVM_FAILURE;
}

try {
  await program().parseAsync(process.argv);
} catch (error) {
  process.exitCode = report(error);
}
