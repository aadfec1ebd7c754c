// Emulator stand-in for the CUDA header of the same name (see tools/simt_emu/simt.h).
#pragma once
#include "../simt.h"
