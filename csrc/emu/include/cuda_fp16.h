// Emulation build only (MOESPEC_CUDA=EMU): stands in for the CUDA header of the same name.
#pragma once
#include "moespec_emu/emu.h"
