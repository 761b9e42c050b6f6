# CMake toolchain for llama.cpp in kilnd for the Raspberry Pi 5 (Cortex-A76), cross-built on
# x86_64 with Debian's gcc-aarch64-linux-gnu. Used through .cargo/config.toml
# (CMAKE_TOOLCHAIN_FILE_aarch64_unknown_linux_gnu).
#
# llama-cpp-sys-2 turns rustc's target-cpu into `-march=<cpu>` (gcc rejects
# `-march=cortex-a76`) and pins ggml to plain armv8-a on Linux/aarch64 (no int8 dot product:
# Q4/Q8 matmuls several times slower). This file sets the A76's architecture instead; FORCE
# overrides the build script's -DGGML_CPU_ARM_ARCH=armv8-a.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(GGML_CPU_ARM_ARCH "armv8.2-a+dotprod+fp16" CACHE STRING "Raspberry Pi 5: Cortex-A76" FORCE)
