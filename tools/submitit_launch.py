"""Submit any of the four scripts to SLURM (or to submitit's local executor) with pre-emption -> requeue -> resume.

    python -m tools.submitit_launch run_pretrain.py --batch_size 128 --model MIM_vit_base_patch16 ... \\
        --output_dir /shared/runs/b16 --nodes 4 --ngpus 8 --partition gpu --timeout 4320
    python -m tools.submitit_launch run_finetune.py --finetune /shared/runs/b16/checkpoint-99.pth ... --ngpus 8
    python -m tools.submitit_launch run_pretrain.py --demo --epochs 4 --output_dir /tmp/d --cluster local --ngpus 0

Launcher flags (below) and script flags may be mixed; every flag the launcher does not know goes to the script and
is checked against the script's own parser before anything is submitted.

How a job runs: one submitit task per process (``--ngpus`` tasks per node, or ``--tasks_per_node``); each task
takes its rank, world size and rendezvous address from submitit's job environment and hands them to the script as
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, which ``util/distributed.init_distributed_mode`` reads (the
torchrun path), so the script runs exactly as under torchrun. The script runs as a child process of the task, so
its own SIGINT/SIGTERM handling (stop at a micro-batch boundary, nothing half-written) and exit codes are unchanged.

Pre-emption and time-out (MAE's ``checkpoint()`` -> ``DelayedSubmission`` pattern): submitit's signal (USR2,
``--signal_delay_s`` before the time limit, or from ``scancel --signal``) makes rank 0 call :meth:`StepsJob.checkpoint`,
which sends SIGTERM to the script (all ranks agree and stop at the same iteration), waits for it, and returns a fresh
copy of the job; submitit requeues it and the script resumes from ``checkpoint-last.pth`` (exact: the unfinished
epoch is trained again from the same RNG state). Job stdout/stderr: ``<job_dir>/<job id>_<task>_log.{out,err}``.
"""
import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __name__ == '__main__' and not __package__:  # run as a file (python tools/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'tools.submitit_launch', *sys.argv[1:]])

REPO_ROOT = Path(__file__).resolve().parent.parent
from util.errors import UserError, exit_main  # noqa: E402
from util.args import ArgumentParser, integer

SCRIPTS = ('run_pretrain.py', 'run_finetune.py', 'run_linprobe.py', 'run_knn.py')
STATE_FILE = 'launch_state.json'  # per output folder: what ran there, and whether it finished
INTERRUPTED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # the scripts' exit codes after a graceful stop


class LaunchError(UserError):
    """Bad launcher/sweep input: one line, exit status 2."""


# ---- the scripts' flags -----------------------------------------------------------------------------------------

def script_path(name: str) -> Path:
    """``run_pretrain.py`` (or any path ending in one of the four script names) -> its absolute path in this repo."""
    base = os.path.basename(name)
    if base not in SCRIPTS:
        raise LaunchError(f'{name}: not one of the scripts {", ".join(SCRIPTS)}')
    return REPO_ROOT / base


def script_parser(name: str) -> argparse.ArgumentParser:
    """The script's own ``get_args_parser()``, with argparse errors raised as :class:`LaunchError` (one line)."""
    import importlib
    module = importlib.import_module(os.path.basename(name)[:-3])
    parser = module.get_args_parser()

    def _error(message: str) -> None:
        raise LaunchError(f'{os.path.basename(name)}: {message}')
    parser.error = _error
    parser.exit_on_error = False
    return parser


def parse_script_argv(name: str, argv: Sequence[str], check: bool = True,
                      inputs: bool = True) -> argparse.Namespace:
    """Check ``argv`` as the script itself does before it starts (raises :class:`LaunchError`, one line) and return
    the parsed flags: its parser with the flags of any plugin argv names, the flags' domains and cross-flag rules
    (util.args.domain_errors), the paths (util.args.path_errors; ``inputs=False`` skips the --resume/--finetune
    files, which an earlier step of a sweep writes), and the FreezeOut flags' rules (freezeout.resolve_freeze_args,
    on a copy). ``check=False``: the parser's types only. The parser is kept as ``ns._parser``."""
    import contextlib
    import copy
    import io
    from util.args import domain_errors, path_errors
    from util.plugins import extend_parser
    base = os.path.basename(name)
    parser = script_parser(name)
    argv = list(argv)
    try:
        extend_parser(parser, argv)  # a plugin's flags parse like the script's own
        ns = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise LaunchError(f'{base}: {e}') from None
    except LaunchError:  # the parser's own error, already naming the script
        raise
    except UserError as e:  # a plugin that does not load
        raise LaunchError(f'{base}: {e}') from None
    ns._parser = parser
    if not check:
        return ns
    problems = domain_errors(ns, parser, argv)
    if inputs:
        problems += path_errors(ns)
    else:
        saved = {d: getattr(ns, d, None) for d in ('resume', 'finetune')}
        for d in saved:
            if hasattr(ns, d):
                setattr(ns, d, '')
        problems += path_errors(ns)
        for d, v in saved.items():
            if hasattr(ns, d):
                setattr(ns, d, v)
    if not problems and hasattr(ns, 'freeze_policy'):
        from freezeout import resolve_freeze_args
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its notes are the script's to print, at start-up
                resolve_freeze_args(copy.copy(ns), argv)
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise LaunchError(f'{base}: {problems[0]}')
    return ns


def flag_value(argv: Sequence[str], flag: str) -> Optional[str]:
    """Value of the last ``--flag V`` / ``--flag=V`` in argv (argparse keeps the last), else None."""
    out = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            out = argv[i + 1]
        elif a.startswith(flag + '='):
            out = a[len(flag) + 1:]
    return out


def without_flags(argv: Sequence[str], with_value: Sequence[str] = (), bare: Sequence[str] = ()) -> List[str]:
    """argv minus every ``--f V`` / ``--f=V`` of ``with_value`` and every bare ``--f`` of ``bare``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in with_value:
            skip = True
            continue
        if any(a.startswith(f + '=') for f in with_value) or a in bare:
            continue
        out.append(a)
    return out


def effective_output_dir(name: str, argv: Sequence[str], cwd: str) -> str:
    """The --output_dir the script will use (its --demo default when --demo is given without one), absolute."""
    ns = parse_script_argv(name, argv)
    out = ns.output_dir
    if getattr(ns, 'demo', False) and flag_value(argv, '--output_dir') is None:
        import importlib
        out = importlib.import_module(os.path.basename(name)[:-3]).DEMO_DEFAULTS.get('output_dir', out)
    return os.path.normpath(os.path.join(cwd, out)) if out else ''


# ---- per-output-folder state ------------------------------------------------------------------------------------

def read_state(output_dir: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(output_dir, STATE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_state(output_dir: str, **fields: Any) -> None:
    """Atomically replace ``<output_dir>/launch_state.json`` with the old fields updated by ``fields``."""
    if not output_dir:
        return
    os.makedirs(output_dir, exist_ok=True)
    state = dict(read_state(output_dir) or {}, **fields)
    tmp = os.path.join(output_dir, f'.{STATE_FILE}.{os.getpid()}.tmp')
    with open(tmp, 'w') as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, os.path.join(output_dir, STATE_FILE))


def check_not_in_use(output_dir: str, flag: str = '--output_dir') -> None:
    """Refuse (one line) a folder whose lock a live run holds, before any state file is written into it."""
    from util.rundir import folder_in_use
    holder = folder_in_use(output_dir) if output_dir else None
    if holder:
        raise LaunchError(f'{flag} {output_dir} is in use by another run ({holder}); nothing was written there; wait '
                          f'for it to finish or choose another folder')


def step_finished(step: Dict[str, Any]) -> bool:
    """The step's output folder records a successful run of exactly this script and argv."""
    st = read_state(step['output_dir']) if step.get('output_dir') else None
    return bool(st) and st.get('state') == 'done' and st.get('script') == os.path.basename(step['script']) \
        and st.get('argv') == list(step['argv'])


def now() -> str:
    return time.strftime('%Y-%m-%dT%H:%M:%S%z')


# ---- the job ----------------------------------------------------------------------------------------------------

class StepsJob:
    """Picklable submitit callable: run the steps (script + argv each) in order, skipping finished ones.

    A step is ``{'script': abs path, 'argv': [...], 'output_dir': abs path or ''}``. Each runs as
    ``python SCRIPT ARGV`` in ``cwd`` with the job's distributed environment. Returns a list of
    ``{'script', 'output_dir', 'status'}`` (``done`` or ``skipped``); raises if a step fails.
    """

    def __init__(self, steps: List[Dict[str, Any]], cwd: str, preempt_wait_s: float = 120.0,
                 stop_wait_s: float = 600.0):
        self.steps = [dict(s) for s in steps]
        self.cwd = cwd
        self.preempt_wait_s = preempt_wait_s
        self.stop_wait_s = stop_wait_s
        self.first_start: Optional[float] = None  # wall clock of the first attempt (survives requeues)
        self.attempt = 0
        self._runtime()

    def _runtime(self) -> None:
        self._proc: Optional[subprocess.Popen] = None
        self._rc: Optional[int] = None
        self._stopping = False

    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ('_proc', '_rc', '_stopping')}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._runtime()

    # -- environment --------------------------------------------------------------------------------------------
    def _child_env(self) -> Dict[str, str]:
        import submitit
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE'):
            env.pop(k, None)
        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            # torchrun's variables: util/distributed.init_distributed_mode reads them first
            dist = submitit.helpers.TorchDistributedEnvironment()
            env.update(MASTER_ADDR=str(dist.master_addr), MASTER_PORT=str(dist.master_port), RANK=str(dist.rank),
                       WORLD_SIZE=str(dist.world_size), LOCAL_RANK=str(dist.local_rank),
                       LOCAL_WORLD_SIZE=str(dist.local_world_size))
        return env

    def _argv_for(self, step: Dict[str, Any]) -> List[str]:
        """A requeued attempt resumes from the checkpoint this job wrote, whatever --resume/--no_auto_resume said."""
        argv = list(step['argv'])
        last = os.path.join(step.get('output_dir') or '', 'checkpoint-last.pth')
        if self.attempt > 0 and step.get('output_dir') and os.path.isfile(last) \
                and os.path.getmtime(last) >= (self.first_start or 0) - 5:
            argv = without_flags(argv, with_value=('--resume',), bare=('--no_auto_resume',)) + ['--resume', last]
        return argv

    # -- running ------------------------------------------------------------------------------------------------
    def __call__(self) -> List[Dict[str, Any]]:
        import submitit
        job = submitit.JobEnvironment()
        rank0 = job.global_rank == 0
        if self.first_start is None:
            self.first_start = time.time()
        print(f'[submitit_launch] job {job.job_id} task {job.global_rank}/{job.num_tasks} on {socket.gethostname()} '
              f'(pid {os.getpid()}), attempt {self.attempt + 1}', flush=True)
        env = self._child_env()
        results = []
        ran = False  # once a step runs again, the steps after it (evaluations of its checkpoint) must too
        for step in self.steps:
            name = os.path.basename(step['script'])
            if not ran and step_finished(step):
                print(f'[submitit_launch] {name} -> {step["output_dir"]}: finished before, skipped', flush=True)
                results.append(dict(script=name, output_dir=step['output_dir'], status='skipped'))
                continue
            argv = self._argv_for(step)
            if rank0:
                check_not_in_use(step['output_dir'])  # a live job's state is not ours to rewrite
                write_state(step['output_dir'], script=name, argv=list(step['argv']), state='running',
                            returncode=None, started=now(), host=socket.gethostname(), job_id=str(job.job_id))
            cmd = [sys.executable, step['script'], *argv]
            print(f'[submitit_launch] running: {shlex.join(cmd)}', flush=True)
            rc = self._run(cmd, env)
            ran = True
            if rc == 0:
                if rank0:
                    write_state(step['output_dir'], state='done', returncode=0, ended=now())
                results.append(dict(script=name, output_dir=step['output_dir'], status='done'))
                continue
            if rank0:
                write_state(step['output_dir'], state='stopped' if rc in INTERRUPTED_CODES else 'failed',
                            returncode=rc, ended=now())
            if rc in INTERRUPTED_CODES:
                # SLURM signals every process of a pre-empted job: give submitit's USR2 (rank 0 requeues) or the
                # scheduler's own requeue time to happen before calling this a failure
                deadline = time.time() + self.preempt_wait_s
                while time.time() < deadline:
                    time.sleep(0.5)
                raise RuntimeError(f'{name} was stopped by a signal (exit status {rc}) and the job was not requeued; '
                                   f'submit the same command again to resume')
            raise RuntimeError(f'{name} exited with status {rc}; see this job\'s log (stderr) for its message')
        return results

    def _run(self, cmd: List[str], env: Dict[str, str]) -> int:
        self._rc = None
        self._proc = subprocess.Popen(cmd, cwd=self.cwd, env=env)

        def watch(proc=self._proc) -> None:
            self._rc = proc.wait()
        # The main thread only sleeps: the signal handler (checkpoint) runs there and must never meet a held lock.
        threading.Thread(target=watch, daemon=True).start()
        while self._rc is None:
            time.sleep(0.2)
        return self._rc

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit (rank 0) on pre-emption/time-out: stop the script gracefully, requeue a fresh copy."""
        import submitit
        self._stopping = True
        proc = self._proc
        if proc is not None and self._rc is None:
            print(f'[submitit_launch] pre-emption/time-out signal: stopping {os.path.basename(proc.args[1])} '
                  f'(pid {proc.pid}) at the next iteration and requeueing', flush=True)
            proc.send_signal(signal.SIGTERM)
            deadline = time.time() + self.stop_wait_s
            while self._rc is None and time.time() < deadline:
                time.sleep(0.2)
            if self._rc is None:  # a checkpoint write is atomic, so a kill is still safe
                proc.kill()
        fresh = StepsJob(self.steps, self.cwd, self.preempt_wait_s, self.stop_wait_s)
        fresh.first_start, fresh.attempt = self.first_start, self.attempt + 1
        return submitit.helpers.DelayedSubmission(fresh)


# ---- executor -----------------------------------------------------------------------------------------------------

def import_submitit():
    try:
        import submitit
    except ImportError:
        raise LaunchError('submitit is not installed: pip install submitit (or pip install -r requirements-dev.txt)') \
            from None
    return submitit


def add_executor_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('SLURM / submitit')
    g.add_argument('--cluster', default='slurm', choices=['slurm', 'local'],
                   help="'slurm' submits with sbatch; 'local' runs the job as a subprocess here through the same "
                        "code path (submitit's local executor) and waits for it (default: slurm)")
    g.add_argument('--nodes', default=1, type=int, help='nodes per job (default: 1)', domain=integer(1))
    g.add_argument('--ngpus', default=None, type=int,
                   help='GPUs per node; 0 for a CPU job (default: 8 with slurm; with local, the GPUs visible here)',
                   domain=integer(0))
    g.add_argument('--tasks_per_node', default=None, type=int,
                   help='processes per node (default: --ngpus, at least 1)', domain=integer(1))
    g.add_argument('--cpus_per_task', default=10, type=int, help='CPU cores per process (default: 10)',
                   domain=integer(1))
    g.add_argument('--mem_gb', default=None, type=int, help='memory per node in GB (default: 40 per GPU, min 16)',
                   domain=integer(1))
    g.add_argument('--timeout', default=4320, type=int,
                   help='time limit per job in minutes; a time-out requeues the job (default: 4320 = 3 days)',
                   domain=integer(1))
    g.add_argument('--partition', default=None, type=str, help='SLURM partition (default: the cluster default)')
    g.add_argument('--account', default=None, type=str, help='SLURM account (default: none)')
    g.add_argument('--constraint', default=None, type=str, help="SLURM --constraint, e.g. 'volta32gb' (default: none)")
    g.add_argument('--comment', default=None, type=str, help='SLURM job comment (default: none)')
    g.add_argument('--exclude', default=None, type=str, help='SLURM nodes to avoid (default: none)')
    g.add_argument('--job_dir', default=None, type=str,
                   help='where submitit keeps the job pickles and the job stdout/stderr '
                        '(<job id>_<task>_log.out/.err) (default: <the script\'s --output_dir>/submitit)')
    g.add_argument('--job_name', default=None, type=str, help='job name (default: vitfreeze_<script>)')
    g.add_argument('--max_requeue', default=30, type=int,
                   help='time-outs after which the job is no longer requeued; pre-emptions do not count '
                        '(default: 30)', domain=integer(0))
    g.add_argument('--signal_delay_s', default=120, type=int,
                   help='seconds before the time limit at which the job is told to stop and requeue (default: 120)',
                   domain=integer(0))
    g.add_argument('--wait', action='store_true',
                   help='wait for the job to end and exit with its status (always on with --cluster local)')


def make_executor(opts: argparse.Namespace, job_dir: str, name: str):
    submitit = import_submitit()
    try:
        executor = submitit.AutoExecutor(folder=job_dir, cluster=opts.cluster,
                                         slurm_max_num_timeout=opts.max_requeue)
    except RuntimeError as e:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise LaunchError(f'--cluster {opts.cluster}: {e} (use --cluster local to run the job on this machine)') \
            from None
    ngpus = opts.ngpus
    if ngpus is None:
        import torch
        ngpus = 8 if opts.cluster == 'slurm' else torch.cuda.device_count()
    tasks = opts.tasks_per_node or max(1, ngpus)
    params = dict(name=name, timeout_min=opts.timeout, nodes=opts.nodes, tasks_per_node=tasks,
                  cpus_per_task=opts.cpus_per_task, mem_gb=opts.mem_gb or max(16, 40 * ngpus),
                  slurm_signal_delay_s=opts.signal_delay_s)
    if ngpus:
        params['gpus_per_node'] = ngpus
    for key in ('partition', 'account', 'constraint', 'comment', 'exclude'):
        if getattr(opts, key):
            params[f'slurm_{key}'] = getattr(opts, key)
    if opts.cluster == 'local':
        if opts.nodes != 1:
            raise LaunchError(f'--nodes {opts.nodes}: the local executor runs one node; use --cluster slurm')
        params = {k: v for k, v in params.items() if not k.startswith('slurm_') and k not in ('nodes', 'mem_gb')}
    executor.update_parameters(**params)
    return executor


def submit(opts: argparse.Namespace, steps: List[Dict[str, Any]], job_dir: str, name: str, cwd: str):
    """Submit one job running ``steps``; returns the submitit job."""
    executor = make_executor(opts, job_dir, name)
    if StepsJob.__module__ != '__main__':  # imported by tools/sweep.py: the job process cannot import tools/
        import cloudpickle
        cloudpickle.register_pickle_by_value(sys.modules[StepsJob.__module__])
    # the local executor never requeues: a stopped step is final at once, not after the pre-emption grace
    job = executor.submit(StepsJob(steps, cwd, preempt_wait_s=0.0 if opts.cluster == 'local' else 120.0))
    print(f'submitted job {job.job_id} ({opts.cluster}): {name}; log: {job_dir}/{job.job_id}_0_log.out '
          f'(stderr: .err)', flush=True)
    return job


def wait_for(job) -> int:
    """Wait for a submitted job; 0 when it finished, 1 (with one line) when it failed."""
    try:
        job.result()
    except Exception as e:  # noqa: BLE001 - submitit wraps the task's exception with its traceback
        last = [l for l in str(e).strip().splitlines() if l.strip()]
        print(f'error: job {job.job_id} failed: {last[-1] if last else e}', file=sys.stderr, flush=True)
        return 1
    print(f'job {job.job_id} finished', flush=True)
    return 0


# ---- command line -------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser('Submit run_pretrain/run_finetune/run_linprobe/run_knn to SLURM through submitit',
                                allow_abbrev=False, usage='%(prog)s SCRIPT [script flags] [launcher flags]')
    p.add_argument('script', help=f'one of {", ".join(SCRIPTS)}')
    add_executor_args(p)
    return p


def main(argv: Sequence[str]) -> int:
    parser = get_args_parser()

    def _error(message: str) -> None:
        raise LaunchError(message)
    parser.error = _error
    opts, script_argv = parser.parse_known_args(list(argv))
    from util.args import domain_errors
    errors = domain_errors(opts, parser, [])  # the launcher's own flags, before anything is submitted
    if errors:
        raise LaunchError(errors[0])
    path = script_path(opts.script)
    cwd = os.getcwd()
    output_dir = effective_output_dir(opts.script, script_argv, cwd)  # also checks every script flag
    check_not_in_use(output_dir)
    job_dir = os.path.abspath(opts.job_dir or os.path.join(output_dir or cwd, 'submitit'))
    name = opts.job_name or f'vitfreeze_{path.stem[4:]}'
    job = submit(opts, [dict(script=str(path), argv=list(script_argv), output_dir=output_dir)], job_dir, name, cwd)
    if opts.cluster == 'local' or opts.wait:
        return wait_for(job)
    return 0


if __name__ == '__main__':
    exit_main(main, sys.argv[1:])
