@echo off
rem wan_lite launcher for Windows (mirrors launch.sh).
rem
rem   launch.bat [app options]          set up (first time only) and start the app in your browser
rem   launch.bat --test [pytest options] set up, add the test tools, run the test suite
rem   launch.bat --check                say what would be done and stop
rem
rem Environment: WAN_LITE_VENV, WAN_LITE_PYTHON, WAN_LITE_TORCH (cpu, cu128, default),
rem WAN_LITE_MIN_FREE_GB, CI=true (no browser, no pause).
rem
rem Arguments and the install path are read before delayed expansion is switched on: with it on, a
rem "!" in a value being stored is taken as a variable marker and lost. After that, values are used
rem as !VAR! (a delayed expansion's result is not parsed again), and a path reaches Python through
rem the environment, never inside Python source (an apostrophe in the path would end the string).
setlocal EnableExtensions DisableDelayedExpansion

set "TORCH_VERSION=2.13.0"
set "CUDA_INDEX=https://download.pytorch.org/whl/cu128"
set "CPU_INDEX=https://download.pytorch.org/whl/cpu"

cd /d "%~dp0"
set "ROOT=%CD%"
set "ROOT_HAS_BANG=0"
if not "%ROOT:!=%"=="%ROOT%" set "ROOT_HAS_BANG=1"

set "MODE=run"
if /i "%~1"=="--test" set "MODE=test"
if /i "%~1"=="--check" set "MODE=check"
rem All the arguments as typed, exclamation marks and quoted ampersands included; the mode word cut off.
set ARGS=%*
if "%MODE%"=="test" set ARGS=%ARGS:*--test=%
if "%MODE%"=="check" set ARGS=%ARGS:*--check=%

setlocal EnableDelayedExpansion
set "INFO=%TEMP%\wan_lite_launch_%RANDOM%.txt"
if "%ROOT_HAS_BANG%"=="1" (
    set "PROBLEM=The path of the wan_lite folder has an exclamation mark in it, which Windows batch files cannot handle."
    set "TODO=Move or rename the folder so its path has no exclamation mark, then run this again."
    goto fail
)
if defined WAN_LITE_VENV (set "VENV=!WAN_LITE_VENV!") else (set "VENV=!ROOT!\.venv")
set "STAMP=!VENV!\.wan_lite_stamp"
set "TEST_STAMP=!VENV!\.wan_lite_test_stamp"

rem --- Python: the venv's, else WAN_LITE_PYTHON, else the py launcher, else python ---------------
set "PY="
if exist "%VENV%\Scripts\python.exe" set "PY=%VENV%\Scripts\python.exe"
if not defined PY if defined WAN_LITE_PYTHON set "PY=%WAN_LITE_PYTHON%"
if not defined PY (
    py -3 -c "import sys; print(sys.executable)" > "%INFO%" 2>nul && set /p PY=<"%INFO%"
)
if not defined PY (
    python -c "import sys; print(sys.executable)" > "%INFO%" 2>nul && set /p PY=<"%INFO%"
)
if not defined PY (
    set "PROBLEM=Python is not installed."
    set "TODO=Install Python 3.10 or newer from https://www.python.org/downloads/ and tick 'Add python.exe to PATH', then run this again."
    goto fail
)
"%PY%" -c "import sys; sys.exit(0 if sys.version_info[:2] >= (3, 10) else 1)" 2>nul
if errorlevel 1 (
    set "PROBLEM=wan_lite needs Python 3.10 or newer, but !PY! is older or does not run."
    set "TODO=Install a newer Python from https://www.python.org/downloads/, or set WAN_LITE_PYTHON to one."
    goto fail
)

rem --- Which torch build ---------------------------------------------------------------------------
if defined WAN_LITE_TORCH (
    set "TORCH_BUILD=%WAN_LITE_TORCH%"
    set "GPU_NOTE=torch build chosen by WAN_LITE_TORCH"
    goto build_chosen
)
set "TORCH_BUILD=cpu"
set "GPU_NOTE=No NVIDIA GPU answered (nvidia-smi missing or failing): using the CPU build of torch. A video takes hours on a CPU; if you have an NVIDIA card, install its driver and run this again."
where nvidia-smi >nul 2>&1 || goto build_chosen
nvidia-smi -L >nul 2>&1 || goto build_chosen
set "TORCH_BUILD=cu128"
set "GPU_NOTE=NVIDIA GPU found."
:build_chosen
if /i not "%TORCH_BUILD%"=="cpu" if /i not "%TORCH_BUILD%"=="cu128" if /i not "%TORCH_BUILD%"=="default" (
    set "PROBLEM=WAN_LITE_TORCH=%TORCH_BUILD% is not a torch build this launcher knows."
    set "TODO=Use cpu, cu128 or default."
    goto fail
)

rem --- What is installed already, and the disk ----------------------------------------------------
"%PY%" -c "import hashlib; h=lambda p: hashlib.sha256(open(p,'rb').read()).hexdigest(); print('torch=%TORCH_VERSION%+%TORCH_BUILD% requirements=' + h('requirements.txt'))" > "%INFO%"
set /p WANT_STAMP=<"%INFO%"
"%PY%" -c "import hashlib; print(hashlib.sha256(open('tests/requirements.txt','rb').read()).hexdigest())" > "%INFO%"
set /p TEST_HASH=<"%INFO%"
set "WANT_TEST_STAMP=%WANT_STAMP% tests=%TEST_HASH%"
set "HAVE_STAMP="
if exist "%STAMP%" set /p HAVE_STAMP=<"%STAMP%"
set "UP_TO_DATE=0"
if exist "%VENV%\Scripts\python.exe" if "%HAVE_STAMP%"=="%WANT_STAMP%" set "UP_TO_DATE=1"
if "%UP_TO_DATE%"=="1" (set "NEED_GB=1") else (set "NEED_GB=10")
if defined WAN_LITE_MIN_FREE_GB set "NEED_GB=%WAN_LITE_MIN_FREE_GB%"
set "FREE_GB="
"%PY%" -c "import os, shutil; print(shutil.disk_usage(os.environ['ROOT']).free // 2**30)" > "%INFO%" 2>nul
set /p FREE_GB=<"%INFO%"
if not defined FREE_GB (
    set "PROBLEM=Could not find out how much disk space is free in !ROOT!."
    set "TODO=Check that the folder exists and can be read, then run this again."
    goto fail
)

if "%MODE%"=="check" (
    rem Delayed expansion (!VAR!) inside blocks: a ")" in a path or note must not end the block.
    echo [wan_lite] Python: !PY!
    echo [wan_lite] Virtual environment: !VENV!
    echo [wan_lite] torch: %TORCH_VERSION%, build %TORCH_BUILD%: !GPU_NOTE!
    echo [wan_lite] Installed and up to date: %UP_TO_DATE%
    echo [wan_lite] Free disk: %FREE_GB% GB, needs %NEED_GB% GB
    goto end
)
if !FREE_GB! LSS !NEED_GB! (
    set "PROBLEM=Only %FREE_GB% GB of disk space is free in !ROOT!; setting up wan_lite needs about %NEED_GB% GB."
    set "TODO=Free some space on this disk, or move the wan_lite folder to a bigger disk, and run this again."
    goto fail
)

rem --- Set up --------------------------------------------------------------------------------------
if not exist "%VENV%\Scripts\python.exe" (
    echo [wan_lite] Creating the virtual environment in !VENV!, first run only...
    "%PY%" -m venv "%VENV%"
    if errorlevel 1 (
        set "PROBLEM=Python could not create a virtual environment."
        set "TODO=Reinstall Python from python.org with the default options, then run this again."
        goto fail
    )
)
set "VPY=%VENV%\Scripts\python.exe"
set "PIP="%VPY%" -m pip install --disable-pip-version-check"

if "%UP_TO_DATE%"=="1" (
    echo [wan_lite] Everything is installed already; starting.
    goto installed
)
echo [wan_lite] !GPU_NOTE!
"%VPY%" -c "import torch; print(torch.__version__)" > "%INFO%" 2>nul
set "HAVE_TORCH="
set /p HAVE_TORCH=<"%INFO%"
if /i "%TORCH_BUILD%"=="cpu" if "%HAVE_TORCH%"=="%TORCH_VERSION%+cpu" goto torch_ok
if /i "%TORCH_BUILD%"=="cpu" if "%HAVE_TORCH%"=="%TORCH_VERSION%" goto torch_ok
if /i "%TORCH_BUILD%"=="cu128" if "%HAVE_TORCH%"=="%TORCH_VERSION%+cu128" goto torch_ok
echo [wan_lite] Installing torch %TORCH_VERSION% (%TORCH_BUILD% build); this downloads up to a few GB...
if /i "%TORCH_BUILD%"=="cu128" (
    %PIP% "torch==%TORCH_VERSION%" --index-url %CUDA_INDEX%
) else if /i "%TORCH_BUILD%"=="cpu" (
    %PIP% "torch==%TORCH_VERSION%" --index-url %CPU_INDEX% --timeout 20 --retries 1 || %PIP% "torch==%TORCH_VERSION%"
) else (
    %PIP% "torch==%TORCH_VERSION%"
)
if errorlevel 1 (
    set "PROBLEM=torch could not be installed."
    set "TODO=Check the internet connection and run this again; set WAN_LITE_TORCH=cpu for the CPU build."
    goto fail
)
:torch_ok
echo [wan_lite] Installing wan_lite's other requirements...
%PIP% -r requirements.txt
if errorlevel 1 (
    set "PROBLEM=The requirements in requirements.txt could not be installed."
    set "TODO=Check the internet connection and run this again; the messages above name the package that failed."
    goto fail
)
> "%STAMP%" echo %WANT_STAMP%
echo [wan_lite] Set up finished; the next start skips all of this.
:installed

if "%MODE%"=="test" (
    set "HAVE_TEST="
    if exist "%TEST_STAMP%" set /p HAVE_TEST=<"%TEST_STAMP%"
    if not "!HAVE_TEST!"=="%WANT_TEST_STAMP%" (
        echo [wan_lite] Installing the test tools ^(tests\requirements.txt^)...
        %PIP% -r tests\requirements.txt
        if errorlevel 1 (
            set "PROBLEM=The test requirements could not be installed."
            set "TODO=Check the internet connection and run this again."
            goto fail
        )
        > "%TEST_STAMP%" echo %WANT_TEST_STAMP%
    )
    echo [wan_lite] Running the tests...
    "%VPY%" -m pytest !ARGS!
    set "RC=!errorlevel!"
    del "%INFO%" >nul 2>&1
    exit /b !RC!
)

echo [wan_lite] Starting wan_lite (close this window or press Ctrl+C to stop)...
del "%INFO%" >nul 2>&1
"%VPY%" app.py !ARGS!
exit /b %errorlevel%

:fail
del "%INFO%" >nul 2>&1
echo.
echo [wan_lite] PROBLEM: !PROBLEM!
echo [wan_lite] What to do: !TODO!
if not defined CI pause
exit /b 1

:end
del "%INFO%" >nul 2>&1
exit /b 0
